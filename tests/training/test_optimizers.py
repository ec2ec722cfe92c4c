"""training/optimizers.py and the memory levers of the training scripts (docs/training.md#memory): `--optimizer`,
bfloat16 weights with stochastic rounding, and whole runs with them (with the EMA on the CPU every N steps). Their
memory is measured by benchmarks/benchmark_training_memory.py (tests/examples/test_benchmark_training_memory.py)."""

import shutil
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdT2IPipeline
from diffusers_pixnerd.training import OPTIMIZERS, create_optimizer, create_optimizer_and_schedule
from diffusers_pixnerd.training.ema import load_ema_state

from ..helpers import C2I_SCRIPT, T2I_SCRIPT, c2i_args, t2i_args

# ---------------------------------------------------------------------------------------------------------- optimizers


def optimizer_args(name, **overrides):
    return Namespace(
        optimizer=name, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0, adam_epsilon=1e-8, **overrides
    )


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_each_optimizer_steps_on_the_cpu_and_lowers_the_loss(name):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if name == "adamw_bf16" else torch.float32
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).to(dtype)
    x = torch.randn(32, 64, dtype=dtype)
    optimizer = create_optimizer(optimizer_args(name), list(model.parameters()), 1.0 if name == "prodigy" else 1e-2)

    def loss():
        return (model(x).float() - x.float()).pow(2).mean()

    first = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * first, (name, first, loss().item())
    assert all(p.dtype == dtype for p in model.parameters())


def test_8bit_adamw_keeps_8_bit_moments():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(256, 256))
    optimizer = create_optimizer(optimizer_args("adamw8bit"), [weight], 1e-3)
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    moments = [t for t in optimizer.state[weight].values() if torch.is_tensor(t) and t.numel() == weight.numel()]
    assert len(moments) == 2 and all(t.dtype == torch.uint8 for t in moments)


def test_bfloat16_weights_keep_updates_below_their_resolution_only_with_stochastic_rounding():
    """1 - 1e-4 rounds back to 1 in bfloat16 (spacing 2^-8 below 1): AdamW's 60 steps of ~lr each vanish with
    round-to-nearest and survive on average with stochastic rounding."""
    steps, lr = 60, 1e-4
    results = {}
    for name in ("adamw", "adamw_bf16"):
        weight = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
        optimizer = create_optimizer(optimizer_args(name), [weight], lr)
        for _ in range(steps):
            weight.grad = torch.ones_like(weight)
            optimizer.step()
        results[name] = weight.float().mean().item()
    assert results["adamw"] == 1.0
    assert results["adamw_bf16"] == pytest.approx(1 - steps * lr, abs=5e-4)


def test_a_missing_optimizer_library_is_named(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "prodigyopt" else find_spec(name))
    with pytest.raises(ImportError, match=r"`--optimizer prodigy` needs the `prodigyopt` package: `pip install"):
        create_optimizer(optimizer_args("prodigy"), [torch.nn.Parameter(torch.zeros(2))], 1.0)
    with pytest.raises(ValueError, match=r"`--optimizer` must be one of .* got 'sgd'"):
        create_optimizer(optimizer_args("sgd"), [torch.nn.Parameter(torch.zeros(2))], 1.0)


def test_bfloat16_weights_refuse_fp16_mixed_precision():
    accelerator = SimpleNamespace(mixed_precision="fp16", num_processes=1)
    args = optimizer_args("adamw_bf16", learning_rate=1e-4, scale_lr=False)
    with pytest.raises(
        ValueError, match="`--optimizer adamw_bf16` trains bfloat16 weights: use `--mixed_precision bf16`"
    ):
        create_optimizer_and_schedule(accelerator, args, [torch.nn.Parameter(torch.zeros(2))], 10)


# ----------------------------------------------------------------------------------- whole runs with the memory levers


def tensors_in(state) -> list[torch.Tensor]:
    """Every tensor of a (nested) optimizer state, in a fixed order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors_in(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in tensors_in(item)]
    return []


def test_a_resumed_run_with_the_memory_levers_ends_in_the_same_state(assets, tmp_path, run_main):
    """8-bit AdamW, the EMA on the CPU every 2 steps: stopped at step 2 and resumed, the run ends as the uninterrupted
    one (weights, EMA, 8-bit optimizer state)."""
    levers = ["--optimizer", "adamw8bit", "--ema_device", "cpu", "--ema_update_interval", 2, "--ema_decay", 0.5]
    args = c2i_args(assets, tmp_path / "full", "--max_train_steps", 4, "--checkpointing_steps", 2, *levers)
    args += ["--no_use_repa", "--learning_rate", 1e-2]
    run_main(C2I_SCRIPT, args)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args[args.index("--output_dir") + 1] = resumed
    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    a, b = full / "checkpoint-4", resumed / "checkpoint-4"
    model_a, model_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    ema_a, ema_b = load_ema_state(str(a / "ema.safetensors")), load_ema_state(str(b / "ema.safetensors"))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 2  # updates at steps 2 and 4
    assert ema_a["decay"] == pytest.approx(0.25)
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    opt_a, opt_b = (torch.load(c / "optimizer.bin", weights_only=True) for c in (a, b))
    tensors_a, tensors_b = tensors_in(opt_a["state"]), tensors_in(opt_b["state"])
    assert len(tensors_a) == len(tensors_b) > 0 and all(torch.equal(x, y) for x, y in zip(tensors_a, tensors_b))
    assert any(t.dtype == torch.uint8 for t in tensors_a)  # the 8-bit moments
    assert "| `optimizer` | `adamw8bit` |" in (full / "README.md").read_text()


def test_bfloat16_full_fine_tuning_trains_bfloat16_weights_and_exports_float32(assets, tmp_path, run_main):
    out = tmp_path / "bf16"
    args = t2i_args(
        assets, "captions_jsonl", out, "--max_train_steps", 3, "--no_use_repa", "--optimizer", "adamw_bf16"
    )
    run_main(T2I_SCRIPT, [*args, "--learning_rate", 1e-3, "--mixed_precision", "bf16"])
    trained = load_file(out / "checkpoint-3" / "model.safetensors")
    assert {v.dtype for k, v in trained.items() if k.startswith("transformer.")} == {torch.bfloat16}
    base = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline").transformer
    tuned = PixNerdT2IPipeline.from_pretrained(out).transformer
    assert tuned.dtype == torch.float32
    moved = [not torch.equal(p.bfloat16(), q.bfloat16()) for p, q in zip(base.parameters(), tuned.parameters())]
    assert sum(moved) > len(moved) // 2
