"""benchmarks/benchmark_sampling.py: the variants it builds (cache, compile, sampler, call) and the rows comparing each
with the first."""

import os
import sys

import pytest

from diffusers_pixnerd import PixNerdPipeline

from ..helpers import BUNDLED, ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_benchmark_sampling_builds_each_variant_from_a_given_pipeline():
    import benchmark_sampling

    args = benchmark_sampling.parse_args(
        ["--variants", "none", "cache=first_block:threshold=0.2+compile=regional", "--batch_size", "2"]
    )
    made = []

    def make_pipeline():
        made.append(PixNerdPipeline.from_pretrained(BUNDLED))
        return made[-1]

    pipes = benchmark_sampling.build(args, "cpu", make_pipeline=make_pipeline)
    assert list(pipes) == args.variants and [pipes[v] for v in args.variants] == made  # a fresh one per variant
    plain, fast = pipes["none"].transformer, pipes[args.variants[1]].transformer
    assert not plain.is_cache_enabled and plain.transformer_blocks[0]._compiled_call_impl is None
    assert fast._cache_config.threshold == 0.2 and fast.transformer_blocks[0]._compiled_call_impl is not None
    with pytest.raises(
        ValueError, match=r"`--variants`: 'fast' is not none or one of cache=..., compile=..., lora=..."
    ):
        benchmark_sampling.build(benchmark_sampling.parse_args(["--variants", "fast"]), "cpu", make_pipeline)


def test_benchmark_sampling_rows_compare_each_variant_with_the_first():
    import benchmark_sampling

    variants = ["none", "cache=first_block:threshold=0.0"]  # a cache that never skips: the same images
    args = benchmark_sampling.parse_args(["--model", BUNDLED, "--variants", *variants, "--batch_size", "2"])
    args.num_inference_steps, args.repeats, args.warmup = 2, 1, 0
    rows = benchmark_sampling.benchmark(args)  # both loaded by `load_pipeline`
    assert [row["variant"] for row in rows] == variants
    # The same computation up to float rounding: with a cache each branch is its own call, whose other batch size
    # changes the GEMM blocking (seen: one pixel one level apart on some CPUs).
    assert all(row["max_pixel_diff"] <= 1 and row["mean_pixel_diff"] < 0.01 and row["min_s"] > 0 for row in rows)
    # 2 steps, CFG on 0.1 < t < 1: the first step (t = 0) unguided, the second on the doubled batch (with a cache:
    # the two branches apart).
    assert [(row["transformer_calls"], row["images_through_transformer"]) for row in rows] == [(2, 6), (3, 6)]


def test_benchmark_sampling_variants_set_the_sampler_and_the_call():
    import benchmark_sampling

    variants = ["none", "steps=1+guidance=1", "preset=c2i-euler100+steps=3"]
    args = benchmark_sampling.parse_args(["--model", BUNDLED, "--variants", *variants, "--batch_size", "2"])
    args.num_inference_steps, args.repeats, args.warmup = 2, 1, 0
    pipes = benchmark_sampling.build(args)
    assert pipes[variants[2]].scheduler.config.solver_order == 1  # the official Euler preset
    rows = {row["variant"]: row for row in benchmark_sampling.benchmark(args, pipes)}
    assert (
        rows["steps=1+guidance=1"]["transformer_calls"],
        rows["steps=1+guidance=1"]["images_through_transformer"],
    ) == (1, 2)
    # Euler, 3 steps at t = 0, 1/3, 2/3: guided (0.1 < t < 1) at the last two.
    assert (rows[variants[2]]["transformer_calls"], rows[variants[2]]["images_through_transformer"]) == (3, 10)
    assert rows["steps=1+guidance=1"]["max_pixel_diff"] > 0
