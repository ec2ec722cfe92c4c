"""benchmarks/benchmark_training_memory.py on a tiny model: the memory levers change the measured peak by what they
should (the XXL/16-T2I numbers of docs/training.md#memory come from the same script, run by hand); its LoRA targets are
the training script's."""

import json
import os
import sys

import pytest

from ..helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import benchmark_training_memory as benchmark  # noqa: E402

TINY = dict(
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    patch_size=4,
    text_embed_dim=24,
    text_max_length=6,
    num_text_refiner_layers=1,
    neural_field_hidden_size=16,
)


GIB = 2**30


def bytes_of(result, part):
    return round(result["breakdown_gib"].get(part, 0.0) * GIB)


def measure(*flags):
    argv = ["--config_json", json.dumps(TINY), "--resolution", "16", "--batch_size", "2", "--timing_steps", "0"]
    return benchmark.measure(benchmark.parse_args([*argv, "--no_use_repa", *map(str, flags)]))


@pytest.fixture(scope="module")
def full_adamw():
    return measure("--method", "full", "--optimizer", "adamw", "--ema_device", "accelerator")


def test_the_peak_holds_weights_gradients_adamw_and_the_ema_at_their_sizes(full_adamw):
    n = full_adamw["settings"]["trained_parameters"]
    assert n == full_adamw["settings"]["parameters"] > 100_000
    assert bytes_of(full_adamw, "weights") >= 4 * n  # float32 weights (+ buffers)
    assert bytes_of(full_adamw, "ema") == 4 * n
    # AdamW: two float32 moments per weight and one float32 step counter per tensor.
    assert 8 * n <= bytes_of(full_adamw, "optimizer") <= 8 * n + 4 * 1000
    parts = sum(full_adamw["breakdown_gib"].values())
    assert parts == pytest.approx(full_adamw["accelerator_peak_gib"], rel=1e-9)


def test_the_ema_on_the_cpu_leaves_the_accelerator_by_exactly_its_size(full_adamw):
    on_cpu = measure("--method", "full", "--optimizer", "adamw", "--ema_device", "cpu")
    ema = full_adamw["breakdown_gib"]["ema"]
    assert on_cpu["host_gib"]["ema"] == pytest.approx(ema) and "ema" not in on_cpu["breakdown_gib"]
    assert on_cpu["accelerator_peak_gib"] == pytest.approx(full_adamw["accelerator_peak_gib"] - ema, rel=1e-6)


def test_8bit_adamw_and_bfloat16_weights_shrink_their_parts(full_adamw):
    n = full_adamw["settings"]["trained_parameters"]
    eight_bit = measure("--method", "full", "--optimizer", "adamw8bit", "--ema_device", "accelerator")
    assert bytes_of(eight_bit, "optimizer") < 0.45 * bytes_of(full_adamw, "optimizer")
    bf16 = measure("--method", "full", "--optimizer", "adamw_bf16", "--ema_device", "accelerator")
    assert bytes_of(bf16, "weights") < 0.55 * bytes_of(full_adamw, "weights")
    assert 4 * n <= bytes_of(bf16, "optimizer") <= 4 * n + 4 * 1000  # two bfloat16 moments
    assert bf16["accelerator_peak_gib"] < full_adamw["accelerator_peak_gib"]


def test_gradient_checkpointing_lowers_the_activations():
    common = [
        "--method",
        "full",
        "--optimizer",
        "adamw",
        "--ema_device",
        "none",
        "--resolution",
        32,
        "--batch_size",
        4,
    ]
    with_checkpointing, without = measure(*common), measure(*common, "--no_gradient_checkpointing")
    activations = [bytes_of(r, "activations_and_temporaries") for r in (with_checkpointing, without)]
    assert activations[0] < 0.7 * activations[1], activations


def test_lora_trains_float32_adapters_on_a_bfloat16_base(full_adamw):
    lora = measure("--method", "lora", "--lora_rank", "4")
    s = lora["settings"]
    assert 0 < s["trained_parameters"] < 0.2 * s["parameters"]
    base = s["parameters"] - s["trained_parameters"]
    buffers = bytes_of(full_adamw, "weights") - 4 * full_adamw["settings"]["parameters"]
    assert bytes_of(lora, "weights") == 2 * base + 4 * s["trained_parameters"] + buffers  # float32 buffers
    assert bytes_of(lora, "gradients") <= 4 * s["trained_parameters"]
    assert lora["accelerator_peak_gib"] < 0.5 * full_adamw["accelerator_peak_gib"]


def test_distillation_reports_the_teacher_phase_and_its_larger_batches_cost_more():
    one = measure("--method", "distill", "--lora_rank", "4", "--teacher_batch_size", "1")
    four = measure("--method", "distill", "--lora_rank", "4", "--teacher_batch_size", "4")
    lora = measure("--method", "lora", "--lora_rank", "4")
    # The training phase is the LoRA step; the reported peak is the larger of the two phases.
    assert one["training_peak_gib"] == pytest.approx(lora["accelerator_peak_gib"], rel=1e-9)
    for result in (one, four):
        assert result["accelerator_peak_gib"] == max(result["teacher_peak_gib"], result["training_peak_gib"])
        # The teacher holds the same weights (bf16 base, float32 adapters) as the training phase.
        assert result["teacher_breakdown_gib"]["weights"] == pytest.approx(lora["breakdown_gib"]["weights"], rel=1e-9)
    activations = [r["teacher_breakdown_gib"].get("activations_and_temporaries", 0) for r in (one, four)]
    assert 2.5 * activations[0] < activations[1]  # guided: 2 and 8 images through the model


def test_the_benchmarks_lora_targets_are_the_training_scripts_default():
    import benchmark_training_memory

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_pixnerd_t2i

    default = train_pixnerd_t2i.lora_target_modules(train_pixnerd_t2i.LORA_TARGET_MODULES)
    assert benchmark_training_memory.LORA_TARGETS == default
