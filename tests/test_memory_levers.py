"""The memory levers of the training scripts (docs/training.md#memory): `--optimizer`, bfloat16 weights with
stochastic rounding, the EMA on the CPU and every N steps, the quantized text encoder, sharded precomputed prompt
embeddings. Their memory is measured by benchmarks/benchmark_training_memory.py (tests/test_benchmark_memory.py)."""

import json
import os
import shutil
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
from conftest import qwen3_tokenizer, tiny_qwen3
from safetensors.torch import load_file
from test_train_scripts import C2I_SCRIPT, T2I_SCRIPT, assets, c2i_args, run_main, t2i_args  # noqa: F401

from diffusers_pixnerd import PixNerdT2IPipeline
from diffusers_pixnerd.training import (
    OPTIMIZERS,
    PromptEmbeddingCache,
    create_ema,
    create_optimizer,
    create_optimizer_and_schedule,
    quantize_text_encoder,
    stream_captions,
    update_ema,
)
from diffusers_pixnerd.training.ema import load_ema_state
from diffusers_pixnerd.training.prompt_cache import encode_share


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
    with pytest.raises(ValueError, match="`--optimizer adamw_bf16` trains bfloat16 weights: use `--mixed_precision bf16`"):
        create_optimizer_and_schedule(accelerator, args, [torch.nn.Parameter(torch.zeros(2))], 10)


# ------------------------------------------------------------------------------------------------------------ EMA


def test_an_ema_updated_every_n_steps_uses_the_decay_to_the_power_n_and_lives_apart():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = create_ema([weight], decay=0.9, update_interval=2, device="cpu")
    assert ema.decay == pytest.approx(0.81)
    expected = torch.zeros(3)
    for step in range(1, 7):
        with torch.no_grad():
            weight.add_(1.0)
        if step % 2 == 0:
            update_ema(ema, [weight])
            expected = 0.81 * expected + 0.19 * weight.detach()
    assert torch.allclose(ema.shadow_params[0], expected) and expected[0] == pytest.approx(2.0049, abs=1e-4)
    assert ema.shadow_params[0].data_ptr() != weight.data_ptr()  # a copy, not the trained tensor


def tensors_in(state) -> list[torch.Tensor]:
    """Every tensor of a (nested) optimizer state, in a fixed order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in tensors_in(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in tensors_in(item)]
    return []


def test_a_resumed_run_with_the_memory_levers_ends_in_the_same_state(assets, tmp_path, run_main):  # noqa: F811
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


def test_bfloat16_full_fine_tuning_trains_bfloat16_weights_and_exports_float32(assets, tmp_path, run_main):  # noqa: F811
    out = tmp_path / "bf16"
    args = t2i_args(assets, "captions_jsonl", out, "--max_train_steps", 3, "--no_use_repa", "--optimizer", "adamw_bf16")
    run_main(T2I_SCRIPT, [*args, "--learning_rate", 1e-3, "--mixed_precision", "bf16"])
    trained = load_file(out / "checkpoint-3" / "model.safetensors")
    assert {v.dtype for k, v in trained.items() if k.startswith("transformer.")} == {torch.bfloat16}
    base = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline").transformer
    tuned = PixNerdT2IPipeline.from_pretrained(out).transformer
    assert tuned.dtype == torch.float32
    moved = [not torch.equal(p.bfloat16(), q.bfloat16()) for p, q in zip(base.parameters(), tuned.parameters())]
    assert sum(moved) > len(moved) // 2


# ---------------------------------------------------------------------------------------------- the text encoder


def test_the_quantized_text_encoder_is_int8_close_and_leaves_the_original():
    pytest.importorskip("torchao", reason="torchao is installed by `make test` (the quantization extra)")
    encoder, tokenizer = tiny_qwen3(), qwen3_tokenizer()
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    ids = tokenizer(["a red fox in the snow", "a cat"], return_tensors="pt", padding=True)
    quantized = quantize_text_encoder(encoder, torch.float32)
    with torch.no_grad():
        reference, approx = encoder(**ids).last_hidden_state, quantized(**ids).last_hidden_state
    assert "Int8" in type(quantized.layers[0].mlp.up_proj.weight).__name__
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in original.items())
    error = (approx - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error


def test_t2i_training_with_the_quantized_encoder_exports_the_original(assets, tmp_path, run_main):  # noqa: F811
    pytest.importorskip("torchao", reason="torchao is installed by `make test` (the quantization extra)")
    out = tmp_path / "q"
    args = t2i_args(assets, "captions_jsonl", out, "--max_train_steps", 2, "--no_use_repa", "--quantize_text_encoder")
    run_main(T2I_SCRIPT, args)
    base = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline").text_encoder.state_dict()
    exported = PixNerdT2IPipeline.from_pretrained(out).text_encoder.state_dict()
    assert base.keys() == exported.keys() and all(torch.equal(base[k], exported[k]) for k in base)


# ------------------------------------------------------------------------------------ precomputed prompt embeddings


def fake_encoder(calls):
    def encode(prompts):
        calls.extend(prompts)
        return torch.stack([torch.full((3, 2), float(len(p))) + torch.arange(2.0) for p in prompts])

    return encode


def test_prompt_embeddings_are_encoded_once_in_shards_and_looked_up(tmp_path):
    captions = ["a cat", "a dog", "a cat", "two red birds", "a fish", "a dog"]
    unique = sorted(set(captions))
    calls = {0: [], 1: []}
    for rank in (0, 1):  # two processes, each its share
        encode_share(unique, fake_encoder(calls[rank]), str(tmp_path), rank, 2, batch_size=2)
    assert calls == {0: unique[0::2], 1: unique[1::2]}
    cache = PromptEmbeddingCache.open(unique, str(tmp_path), 2)
    embeds = cache.lookup(["two red birds", "a cat"])
    assert embeds.dtype == torch.float16 and embeds.shape == (2, 3, 2)
    assert torch.equal(embeds[0, :, 1], torch.full((3,), 14.0)) and torch.equal(embeds[1, 0], torch.tensor([5.0, 6.0]))
    again = []
    encode_share(unique, fake_encoder(again), str(tmp_path), 0, 2)
    assert again == []  # a shard already there is reused
    with pytest.raises(KeyError, match="'a horse' was not precomputed"):
        cache.lookup(["a horse"])
    with pytest.raises(ValueError, match="holds 2 rows for 4 captions: delete it"):
        os.remove(tmp_path / "shard-1-of-2.arrow")
        PromptEmbeddingCache.open(unique, str(tmp_path), 2)


def test_captions_of_a_streamed_dataset_are_read_in_one_pass():
    import datasets

    rows = {"caption": ["a", "b", "a"], "image": [1, 2, 3]}
    assert list(stream_captions(datasets.Dataset.from_dict(rows))) == ["a", "b", "a"]
    assert list(stream_captions(datasets.Dataset.from_dict(rows).to_iterable_dataset())) == ["a", "b", "a"]


def test_precomputed_embeddings_work_with_a_streamed_dataset(assets, tmp_path, run_main):  # noqa: F811
    out = tmp_path / "stream"
    args = t2i_args(assets, "captions_jsonl", out, "--max_train_steps", 2, "--no_use_repa", "--use_lora")
    run_main(T2I_SCRIPT, [*args, "--lora_rank", 2, "--streaming", "--precompute_text_embeddings"])
    folders = [f for f in os.listdir(out / "cache") if f.startswith("prompt_embeds_")]
    assert len(folders) == 1 and os.listdir(out / "cache" / folders[0]) == ["shard-0-of-1.arrow"]
    assert json.loads((out / "checkpoint-2" / "training_state.json").read_text())["global_step"] == 2


def test_a_missing_training_package_names_the_extra(monkeypatch):
    import importlib.util

    from diffusers_pixnerd.training.cli import require_training_extra

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "peft" else find_spec(name))
    with pytest.raises(ImportError, match=r'Training needs peft: `pip install "diffusers-pixnerd\[training\]"`'):
        require_training_extra("datasets", "peft")
    require_training_extra("datasets")  # present: no error


def test_one_version_string():
    import re

    import diffusers_pixnerd

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    setup = open(os.path.join(root, "setup.py"), encoding="utf-8").read()
    assert "version=VERSION" in setup and not re.search(r'version="\d', setup)
    assert diffusers_pixnerd.__version__ == "0.2.0.dev0"
