"""Sharded training, run: the training scripts under Accelerate's FSDP2 (`examples/accelerate_configs/fsdp.yaml`) and
DeepSpeed ZeRO-2 (`examples/accelerate_configs/deepspeed_zero2.yaml`) on 2 CPU processes over gloo, with tiny models,
compared with CPU DDP runs of the same seed and data; and the shipped launcher configs.

How they run on CPUs: `accelerate launch --config_file <the shipped file> --num_processes 2` starts
`tests/examples/sharded_on_cpu.py` in place of the script. Accelerate drops both engines on CPUs in one place
(`AcceleratorState.__init__`: its FSDP branch is only taken for GPU-like process groups, its DeepSpeed branch only with
`cpu=False`), and that file does what the skipped branch does, then runs the script unchanged; see its docstring.
Nothing of diffusers-pixnerd is patched: `Accelerator.prepare` (`fully_shard`, DeepSpeed's engine), sharded
`save_state` / `load_state`, `get_state_dict` and our `TrainingRun` run as on GPUs. The only option changed from the
shipped files is `--num_processes 2`, plus `--mixed_precision no` where runs are compared bit for bit.

What is compared, and how exactly:
- class-conditional FSDP vs DDP: bit-identical (exported EMA weights, and the per-rank EMA shards put together equal
  DDP's EMA). Each process sees the same data and draws the same noise in both, the averaged gradients are equal
  bit for bit, and AdamW and the EMA work elementwise on each shard.
- text-to-image FSDP vs DDP: close, not equal (tolerance below). From the first step the gradients of the weights
  outside the wrapped blocks (text refiner, text projection, timestep embedder) differ in the last bits: FSDP2 adds
  autograd nodes at each shard unit's boundary, which changes the order in which autograd sums the gradient
  contributions of a tensor that several units use (the refined text and the timestep embedding feed every block).
  With the whole model in one shard unit the gradients are equal bit for bit (checked by hand); the class-conditional
  model, whose shared inputs reach the blocks differently, happens to sum in the same order.
- a resumed FSDP (and DeepSpeed) run against the uninterrupted one: bit-identical."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline
from diffusers_pixnerd.training import PixNerdTrainingModule, REPAProjector
from diffusers_pixnerd.training.ema import load_ema_state

from ..helpers import C2I_SCRIPT, ROOT, T2I_SCRIPT, c2i_args, exported_weights, free_port, launch, t2i_args, tiny_c2i
from ..helpers import sample_two_steps as sample

pytestmark = pytest.mark.usefixtures("single_thread")


CONFIGS = os.path.join(ROOT, "examples", "accelerate_configs")


ON_CPU = os.path.join(ROOT, "tests", "examples", "sharded_on_cpu.py")


requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (`pip install deepspeed`; not a dependency of diffusers-pixnerd)",
)


C2I_RUN = [
    "--max_train_steps",
    4,
    "--checkpointing_steps",
    2,
    "--validation_steps",
    2,
    "--no_use_repa",
    "--ema_decay",
    0.5,
    "--learning_rate",
    1e-3,
]


# -------------------------------------------------------------------------------------- class-conditional: bit for bit


def ema_shards_joined(checkpoint) -> list[torch.Tensor]:
    """The EMA of an FSDP checkpoint, whole: each tensor is dim-0 shards, rank 0's first (FSDP2's `Shard(0)`)."""
    shards = [load_ema_state(str(checkpoint / f"ema-rank{rank}.safetensors")) for rank in (0, 1)]
    assert shards[0]["optimization_step"] == shards[1]["optimization_step"]
    return [torch.cat(parts) for parts in zip(shards[0]["shadow_params"], shards[1]["shadow_params"])]


def dcp_model_state(checkpoint, tmp_path) -> dict[str, torch.Tensor]:
    """The training module's weights in an FSDP checkpoint (Accelerate's sharded `pytorch_model_fsdp_0`), whole."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = tmp_path / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "pytorch_model_fsdp_0", target)
    return torch.load(target, weights_only=True)["model"]


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def c2i_ddp(assets, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("c2i_ddp")
    log = launch(C2I_SCRIPT, c2i_args(assets, tmp_path / "out", *C2I_RUN), tmp_path, num_processes=2)
    return tmp_path / "out", log


FSDP_CONFIG = os.path.join(CONFIGS, "fsdp.yaml")


def launch_sharded(config, script, args, tmp_path, mixed_precision=None, num_processes=2, fails=False) -> str:
    """`accelerate launch --config_file <config> --num_processes 2` of `script` on CPU processes; returns the log."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        config,
        "--num_processes",
        str(num_processes),
        "--main_process_port",
        str(free_port()),
    ]
    if mixed_precision is not None:
        command += ["--mixed_precision", mixed_precision]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "DS_ACCELERATOR": "cpu",
    }
    result = subprocess.run(
        [*command, ON_CPU, script, *map(str, args)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    log = result.stdout + result.stderr
    assert (result.returncode != 0) == fails, log[-6000:]
    return log


@pytest.fixture(scope="module")
def c2i_fsdp(assets, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("c2i_fsdp")
    args = c2i_args(assets, tmp_path / "out", *C2I_RUN)
    log = launch_sharded(FSDP_CONFIG, C2I_SCRIPT, args, tmp_path, mixed_precision="no")
    return tmp_path / "out", log


def test_fsdp_shards_the_ema_and_exports_what_ddp_exports(c2i_fsdp, c2i_ddp):
    out, log = c2i_fsdp
    assert "Processes: 2 (DistributedType.FSDP)" in log
    # Sharded checkpoints: Accelerate's sharded model and optimizer folders, one EMA shard per process.
    for step in (2, 4):
        files = set(os.listdir(out / f"checkpoint-{step}"))
        assert {"pytorch_model_fsdp_0", "optimizer_0", "ema-rank0.safetensors", "ema-rank1.safetensors"} <= files
        assert not {"model.safetensors", "ema.safetensors"} & files
    shard = load_ema_state(str(out / "checkpoint-4" / "ema-rank1.safetensors"))["shadow_params"]
    exported = exported_weights(out)
    assert sum(t.numel() for t in shard) < 0.6 * sum(t.numel() for t in exported.values())  # about half each
    # Every rank's shard EMA'd and the export gathered: the run ends where the DDP run ends, bit for bit.
    ddp_out, _ = c2i_ddp
    assert_same_tensors(exported, exported_weights(ddp_out))
    ddp_ema = load_ema_state(str(ddp_out / "checkpoint-4" / "ema.safetensors"))
    fsdp_ema = ema_shards_joined(out / "checkpoint-4")
    assert len(fsdp_ema) == len(ddp_ema["shadow_params"])
    assert all(torch.equal(a, b) for a, b in zip(fsdp_ema, ddp_ema["shadow_params"]))
    # The export holds the EMA, not the trained weights, and training moved them.
    pipe = PixNerdPipeline.from_pretrained(out)
    assert all(torch.equal(p, e) for p, e in zip(pipe.transformer.parameters(), fsdp_ema))
    trained = dcp_model_state(out / "checkpoint-4", out.parent)
    names = [name for name, _ in pipe.transformer.named_parameters()]
    assert not all(torch.equal(trained[f"transformer.{n}"], e) for n, e in zip(names, fsdp_ema))
    before = dcp_model_state(out / "checkpoint-2", out.parent)
    assert not all(torch.equal(before[k], trained[k]) for k in trained)
    # Validation ran on the sharded model (FSDP gathers the root's weights for the pipeline), the 3 images shared by
    # the 2 processes (one renders a padding image): the images of the DDP run, whose weights are the same.
    assert sorted(os.listdir(out / "validation")) == ["final", "step-0", "step-2", "step-4"]
    for folder in ("step-0", "final"):
        names = sorted(os.listdir(out / "validation" / folder))
        assert names == sorted(os.listdir(ddp_out / "validation" / folder)) and len(names) == 3
        for name in names:
            images = [PIL.Image.open(o / "validation" / folder / name) for o in (out, ddp_out)]
            assert np.array_equal(*map(np.asarray, images)), (folder, name)
    assert torch.isfinite(sample(pipe, "fish")).all()


def test_fsdp_resumed_run_ends_bit_identical(assets, c2i_fsdp, tmp_path):
    full, _ = c2i_fsdp
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args = [*c2i_args(assets, resumed, *C2I_RUN), "--resume_from_checkpoint", "latest"]
    # One EMA shard per process: another number of processes is refused.
    log = launch_sharded(FSDP_CONFIG, C2I_SCRIPT, args, tmp_path, "no", num_processes=1, fails=True)
    assert "was written by 2 FSDP processes, one EMA shard each (ema-rank<i>.safetensors): resume it with 2" in log
    log = launch_sharded(FSDP_CONFIG, C2I_SCRIPT, args, tmp_path, mixed_precision="no")
    assert "checkpoint-2 (step 2)" in log
    assert_same_tensors(exported_weights(resumed), exported_weights(full))
    states = [dcp_model_state(c / "checkpoint-4", tmp_path) for c in (full, resumed)]
    assert_same_tensors(*states)
    for rank in (0, 1):
        a, b = (load_ema_state(str(c / "checkpoint-4" / f"ema-rank{rank}.safetensors")) for c in (full, resumed))
        assert a["optimization_step"] == b["optimization_step"] == 4
        assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"]))


DEEPSPEED_CONFIG = os.path.join(CONFIGS, "deepspeed_zero2.yaml")


@requires_deepspeed
def test_deepspeed_zero2_exports_what_ddp_exports_and_resumes_bit_identical(assets, c2i_ddp, tmp_path):
    """ZeRO-2 (optimizer state and gradients partitioned, whole weights everywhere) through DeepSpeed's CPU accelerator.
    Its `gradient_clipping: 1.0` is not reached by this run's gradients, so the DDP run (no clipping) is the same
    computation. The first DeepSpeed run on a machine compiles its CPU communication op (about 2 minutes, cached)."""
    full = tmp_path / "full"
    log = launch_sharded(DEEPSPEED_CONFIG, C2I_SCRIPT, c2i_args(assets, full, *C2I_RUN), tmp_path, "no")
    assert "Processes: 2 (DistributedType.DEEPSPEED)" in log
    assert "World size 2: all processes hold identical weights after step 1" in log
    files = set(os.listdir(full / "checkpoint-2"))
    assert {"pytorch_model", "ema.safetensors"} <= files and "model.safetensors" not in files
    assert any("optim_states" in f for f in os.listdir(full / "checkpoint-2" / "pytorch_model"))
    ddp_out, _ = c2i_ddp
    assert_same_tensors(exported_weights(full), exported_weights(ddp_out))
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args = [*c2i_args(assets, resumed, *C2I_RUN), "--resume_from_checkpoint", "latest"]
    log = launch_sharded(DEEPSPEED_CONFIG, C2I_SCRIPT, args, tmp_path, "no")
    assert "checkpoint-2 (step 2)" in log
    assert_same_tensors(exported_weights(resumed), exported_weights(full))
    a, b = (load_ema_state(str(c / "checkpoint-4" / "ema.safetensors")) for c in (full, resumed))
    assert all(torch.equal(x, y) for x, y in zip(a["shadow_params"], b["shadow_params"]))


# ------------------------------------------------------------------------------------------------------- text-to-image


def test_t2i_full_fine_tuning_with_text_encoder_layers_under_fsdp_is_close_to_ddp(assets, tmp_path):
    """REPA, clipping at 1.0 and the last Qwen3 layer trained, sharded with the rest. Tolerance: 1e-5 on the exported
    weights, 1% of one step at this learning rate (1e-3: AdamW moves a weight by about that much per step); measured
    1.7e-6 (transformer) and 5.3e-7 (Qwen3), where the 3 steps moved weights by up to 2.1e-3. The gradients differ in
    their last bits (see the module docstring; with clipping the norm is also summed per shard), and AdamW divides by
    the gradient's running RMS, so these differences reach the weights scaled to the learning rate, not to the
    gradients."""
    run = [
        "--max_train_steps",
        3,
        "--checkpointing_steps",
        3,
        "--validation_steps",
        3,
        "--train_text_encoder_layers",
        1,
        "--repa_encoder",
        assets / "dinov2",
        "--repa_align_layer",
        1,
        "--ema_decay",
        0.5,
        "--learning_rate",
        1e-3,
    ]
    fsdp, ddp = tmp_path / "fsdp", tmp_path / "ddp"
    log = launch_sharded(FSDP_CONFIG, T2I_SCRIPT, t2i_args(assets, "captions_jsonl", fsdp, *run), tmp_path, "no")
    assert "Processes: 2 (DistributedType.FSDP)" in log
    launch(T2I_SCRIPT, t2i_args(assets, "captions_jsonl", ddp, *run), tmp_path, num_processes=2)
    base = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    tuned, reference = PixNerdT2IPipeline.from_pretrained(fsdp), PixNerdT2IPipeline.from_pretrained(ddp)
    for module in ("transformer", "text_encoder"):
        a, b = getattr(tuned, module).state_dict(), getattr(reference, module).state_dict()
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # Trained: the transformer and the last Qwen3 layer; frozen: the first Qwen3 layer.
    up_proj = [pipe.text_encoder.layers[-1].mlp.up_proj.weight for pipe in (base, tuned)]
    assert (up_proj[0] - up_proj[1]).abs().max() > 1e-4
    assert torch.equal(base.text_encoder.layers[0].mlp.up_proj.weight, tuned.text_encoder.layers[0].mlp.up_proj.weight)
    assert (base.transformer.patch_embed.weight - tuned.transformer.patch_embed.weight).abs().max() > 1e-4
    assert torch.isfinite(sample(tuned, "a cat")).all()


def test_lora_under_fsdp_as_shipped(assets, tmp_path):
    """LoRA with `fsdp.yaml` unchanged (bf16): the frozen base in bf16 and the float32 adapters share shard units
    (FSDP2 shards per parameter, so frozen and trained weights may mix), with REPA, clipping and an EMA of the
    adapters. The exported adapters are gathered from the shards with the EMA in place."""
    out = tmp_path / "lora"
    run = [
        "--use_lora",
        "--lora_rank",
        4,
        "--learning_rate",
        1e-2,
        "--max_train_steps",
        2,
        "--checkpointing_steps",
        2,
        "--validation_steps",
        2,
        "--use_repa",
        "--repa_encoder",
        assets / "dinov2",
        "--repa_align_layer",
        1,
        "--use_ema",
        "--ema_decay",
        0.5,
    ]
    log = launch_sharded(FSDP_CONFIG, T2I_SCRIPT, t2i_args(assets, "captions_txt", out, *run), tmp_path)
    assert "Processes: 2 (DistributedType.FSDP)" in log and "Saved the LoRA weights" in log
    pipe = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    base_weights = {k: v.to(torch.bfloat16) for k, v in pipe.transformer.state_dict().items()}
    before = sample(pipe, "a cat")
    pipe.load_lora_weights(out)
    adapters = [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    ema = ema_shards_joined(out / "checkpoint-2")
    assert len(adapters) == len(ema) > 0
    assert all(torch.equal(p, e) for p, e in zip(adapters, ema))  # the export is the gathered EMA
    assert (sample(pipe, "a cat") - before).abs().max() > 1e-3
    # The base stayed frozen: the checkpoint's base weights are the pipeline's, in bf16.
    trained = dcp_model_state(out / "checkpoint-2", tmp_path)
    base_keys = {k: k.replace(".base_layer", "") for k in trained if k.startswith("transformer.") and "lora_" not in k}
    assert len(base_keys) == len(base_weights)
    assert all(torch.equal(trained[k], base_weights[name[len("transformer.") :]]) for k, name in base_keys.items())


def test_lora_distillation_under_fsdp_shares_the_teacher_samples(assets, tmp_path):
    """`--distill --use_lora` with `fsdp.yaml` as shipped: the two processes sample their halves of the teacher images
    (before the model is sharded), the main one merges them; the student trains sharded and exports a few-step LoRA."""
    from diffusers_pixnerd import load_pipeline
    from diffusers_pixnerd.training.distill import TEACHER_SAMPLES_PREFIX

    from ..helpers import distill_args

    out = tmp_path / "turbo"
    args = distill_args(assets, tmp_path, out, "--max_train_steps", 2, "--checkpointing_steps", 2)
    log = launch_sharded(FSDP_CONFIG, T2I_SCRIPT, args, tmp_path)
    assert "Processes: 2 (DistributedType.FSDP)" in log and "Saved the LoRA weights" in log
    (folder,) = out.glob(f"{TEACHER_SAMPLES_PREFIX}*")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [row["index"] for row in rows] == list(range(6)) and not list(folder.glob("metadata-*"))
    assert all((folder / row["file_name"]).is_file() for row in rows)
    pipe = load_pipeline(assets / "t2i_pipeline", lora=out)
    assert pipe.scheduler.config.num_inference_steps == 4 and pipe.scheduler.config.guidance_scale == 1.0
    before = sample(load_pipeline(assets / "t2i_pipeline"), "a cat")
    assert (sample(pipe, "a cat") - before).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- the shipped launcher configs


def test_fsdp_config_wraps_the_pixnerd_blocks():
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    with open(os.path.join(ROOT, "examples", "accelerate_configs", "fsdp.yaml")) as f:
        config = yaml.safe_load(f)
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP"
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","),
        state_dict_type=fsdp["fsdp_state_dict_type"],
    )
    plugin.set_auto_wrap_policy(PixNerdTrainingModule(tiny_c2i(), REPAProjector(32, 32), align_layer=1))
    names = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert names == {"PixNerdTransformerBlock", "PixNerdNeuralField"}


def test_deepspeed_config_is_zero2_with_clipping():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "examples", "accelerate_configs", "deepspeed_zero2.yaml"))
    assert config.distributed_type == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 2 and config.deepspeed_config["gradient_clipping"] == 1.0
