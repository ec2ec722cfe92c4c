"""Plain helpers and constants shared by the test modules of the unit folders (the pytest fixtures are in conftest.py;
the tiny model configurations, in `diffusers_pixnerd.testing_utils`). Test modules import from here, never from one
another: `from ..helpers import tiny_c2i_pipeline, sample`."""

import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I, qwen3_tokenizer, randomize_, tiny_qwen3

# ------------------------------------------------------------------------------------------------ repository paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
C2I_CKPT = os.path.join(FIXTURES, "official_c2i_tiny.ckpt")
T2I_CKPT = os.path.join(FIXTURES, "official_t2i_tiny.ckpt")
SAMPLES = os.path.join(FIXTURES, "official_pipeline_samples.safetensors")  # scripts/generate_pipeline_fixtures.py
C2I_SCRIPT = os.path.join(ROOT, "examples", "train_pixnerd_c2i.py")
T2I_SCRIPT = os.path.join(ROOT, "examples", "train_pixnerd_t2i.py")
# The bundled Fashion-MNIST models (models/).
BUNDLED = os.path.join(ROOT, "models", "pixnerd-fashion-mnist")
BUNDLED_T2I = os.path.join(ROOT, "models", "pixnerd-t2i-fashion-mnist")
BUNDLED_LORA = os.path.join(ROOT, "models", "pixnerd-t2i-fashion-mnist-red-lora")
BUNDLED_TURBO = os.path.join(ROOT, "models", "pixnerd-t2i-fashion-mnist-turbo-lora")
CLASSIFIER = os.path.join(ROOT, "models", "fashion-mnist-classifier.safetensors")


# ------------------------------------------------------------------------------------- tiny pipelines and sampling

TOLERANCE = 1e-5  # max |ours - official| / max |official|: float32 rounding (the sum order differs)
# Batched vs one-by-one: the GEMM blocking changes with the batch size, and the random tiny T2I model amplifies that
# float32 rounding to ~1.3e-5 in two guided steps (with the transformer in float64 both agree exactly).
BATCH_TOLERANCE = 1e-4

LABELS = {"0": "cat, kitty", "1": "dog", "2": "tench, Tinca tinca", "3": "goldfish"}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def official_samples() -> tuple[dict, dict]:
    with safe_open(SAMPLES, "pt") as f:
        metadata = f.metadata()
    return load_file(SAMPLES), {k: json.loads(v) for k, v in metadata.items() if k != "official_commit"}


def official_state_dict(path=C2I_CKPT):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def tiny_c2i_pipeline(id2label=None, num_classes=10, **scheduler_kwargs) -> PixNerdPipeline:
    torch.manual_seed(0)
    transformer = randomize_(PixNerdTransformer2DModel(**{**TINY_C2I, "num_classes": num_classes})).eval()
    scheduler = PixNerdFlowMatchScheduler(**{"num_inference_steps": 2, "guidance_scale": 3.0, **scheduler_kwargs})
    pipe = PixNerdPipeline(transformer=transformer, scheduler=scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t2i_pipeline(with_text_encoder=False, text_embed_dim=24, **scheduler_kwargs) -> PixNerdT2IPipeline:
    torch.manual_seed(0)
    transformer = randomize_(PixNerdTransformer2DModel(**{**TINY_T2I, "text_embed_dim": text_embed_dim})).eval()
    scheduler = PixNerdFlowMatchScheduler(**{"num_inference_steps": 2, "guidance_scale": 3.0, **scheduler_kwargs})
    text_encoder = tiny_qwen3(official_samples()[1]["qwen3_config"]) if with_text_encoder else None
    tokenizer = qwen3_tokenizer() if with_text_encoder else None
    pipe = PixNerdT2IPipeline(
        transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, *args, seed=0, **kwargs) -> torch.Tensor:
    """The raw pixels (`output_type="latent"`, nominally in [-1, 1]) for a seed."""
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe(*args, output_type="latent", **kwargs).images


def sample_two_steps(pipe, *args, **kwargs):
    """The raw pixels of 2 steps from seed 0 (what the training-script tests compare; imported there as `sample`)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        *args, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs
    ).images


def count_transformer_calls(pipe, monkeypatch) -> list[int]:
    """The batch size of every transformer call, recorded while the pipeline runs."""
    batch_sizes, forward = [], pipe.transformer.forward

    def spy(hidden_states, *args, **kwargs):
        batch_sizes.append(hidden_states.shape[0])
        return forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    return batch_sizes


def own_sigmas(pipe, num_inference_steps: int) -> torch.Tensor:
    """The sigmas of the scheduler's own grid (unshifted: the tiny pipelines use shift 1), without the final 0."""
    assert pipe.scheduler.config.shift == 1.0
    pipe.scheduler.set_timesteps(num_inference_steps)
    return pipe.scheduler.sigmas[:-1].clone()


# --------------------------------------------------------------------------------------------- tiny training parts


def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224
    )
    return Dinov2Model(config).eval()


def tiny_c2i(**overrides):
    torch.manual_seed(0)
    return PixNerdTransformer2DModel(**{**TINY_C2I, **overrides})


def lora_transformer_and_encoder(seed=0):
    """A tiny T2I transformer and Qwen3, both with LoRA adapters whose B is random (as after training)."""
    from diffusers_pixnerd.training.lora import add_lora_adapters

    torch.manual_seed(seed)
    transformer, encoder = randomize_(PixNerdTransformer2DModel(**TINY_T2I)).eval(), tiny_qwen3()
    base = copy.deepcopy(transformer), copy.deepcopy(encoder)
    add_lora_adapters(transformer, 4, target_modules=["to_q", "to_v", "param_generator"])
    add_lora_adapters(encoder, 2, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    for module in (transformer, encoder):
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.data = torch.randn(parameter.shape, generator=gen) * 0.3
    return transformer, encoder, base


def random_image(rng, height, width):
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


def save_image(path, height, width, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8)).save(path)


def rgba_folder(root, sizes=((24, 16), (16, 24))) -> str:
    """Captioned RGBA images whose left half (in width) is transparent, and their masks as files in `masks/`."""
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "masks", exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        rgba = np.full((height, width, 4), 200, np.uint8)
        rgba[..., 3] = 255
        rgba[:, : width // 2, 3] = 0
        PIL.Image.fromarray(rgba, "RGBA").save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text("a square")
        PIL.Image.fromarray(rgba[..., 3]).save(root / "masks" / f"{i}.png")
    return str(root)


# ------------------------------------------------------------------------ the training scripts (the `assets` fixture)

CLASSES = ["cat", "dog", "fish"]  # the class folders of `assets`
TINY_MODEL = {k: v for k, v in TINY_C2I.items() if k not in ("sample_size", "num_classes")}
DISTILL_PROMPTS = ["a cat", "a red square", "a tree on a hill"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, args, tmp_path, num_processes=1, mixed_precision="no") -> str:
    """`accelerate launch` as a user would type it (2 processes: CPU DDP); returns the combined log."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--num_processes",
        str(num_processes),
        "--mixed_precision",
        mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    if num_processes > 1:
        command += ["--multi_gpu", "--main_process_port", str(free_port())]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    result = subprocess.run(
        [*command, script, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


def c2i_args(assets, output_dir, *extra):
    return [
        "--model_config",
        assets / "tiny.json",
        "--resolution",
        16,
        "--train_data_dir",
        assets / "classes",
        "--repa_encoder",
        assets / "dinov2",
        "--repa_align_layer",
        1,
        "--train_batch_size",
        2,
        "--dataloader_num_workers",
        0,
        "--validation_num_inference_steps",
        2,
        "--output_dir",
        output_dir,
        "--seed",
        0,
        "--report_to",
        "none",
        *extra,
    ]


def t2i_args(assets, data, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path",
        assets / "t2i_pipeline",
        "--train_data_dir",
        assets / data,
        "--train_batch_size",
        1,
        "--dataloader_num_workers",
        0,
        "--validation_num_inference_steps",
        2,
        "--validation_prompts",
        "a cat",
        "--output_dir",
        output_dir,
        "--seed",
        0,
        "--report_to",
        "none",
        *extra,
    ]


def distill_args(assets, tmp_path, output_dir, *extra):
    """A tiny distillation run: 6 teacher samples of the tiny T2I pipeline (16 px), LoRA rank 4, 4 steps."""
    (tmp_path / "prompts.txt").write_text("\n".join(DISTILL_PROMPTS) + "\n")
    args = t2i_args(assets, "captions_txt", output_dir)
    at = args.index("--train_data_dir")
    del args[at : at + 2]  # distillation makes its own data
    return [
        *args,
        "--distill",
        "--distill_prompts_file",
        tmp_path / "prompts.txt",
        "--num_distill_samples",
        6,
        "--teacher_batch_size",
        4,
        "--teacher_num_inference_steps",
        3,
        "--distill_steps",
        1,
        2,
        4,
        "--train_batch_size",
        2,
        "--use_lora",
        "--lora_rank",
        4,
        "--learning_rate",
        1e-2,
        *extra,
    ]


def exported_weights(folder):
    return load_file(os.path.join(folder, "transformer", "diffusion_pytorch_model.safetensors"))
