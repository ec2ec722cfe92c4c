"""Pipeline sampling time with diffusers' caches and torch.compile, side by side in one process.

    python benchmarks/benchmark_sampling.py --model models/pixnerd-fashion-mnist --batch_size 10 --repeats 3 \
        --variants none cache=first_block:threshold=0.2 cache=taylorseer:cache_interval=3 compile=regional

Every variant is its own copy of the pipeline (compiling and caching change the transformer in place) and samples
the same labels (or prompts) with the same seeds and the saved sampler. The variants' timed runs alternate (these
machines are noisy) and the minimum is reported, with the speed-up over the first variant and the largest and mean
pixel difference from its images (0-255 scale). The first call of each variant is timed apart (for `compile=` it
includes the compilation), then `--warmup` untimed calls. A variant is `none`, `cache=NAME[:key=value,...]` (`examples/generate.py --cache`),
`compile=regional|full`, or both joined by `+` (`cache=first_block:threshold=0.2+compile=regional`).
Quality at scale (class accuracy, FID on >= 1,000 samples) is `examples/evaluate.py --cache ...`.
"""

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from generate import BUNDLED_MODEL, BUNDLED_T2I_PROMPTS, cache_config, compile_transformer, load_pipeline  # noqa: E402

from diffusers_pixnerd import PixNerdT2IPipeline  # noqa: E402


def prepare(model: str, variant: str):
    """A fresh pipeline with the variant's cache and compile mode."""
    pipe = load_pipeline(model, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for part in filter(lambda p: p != "none", variant.split("+")):
        kind, sep, value = part.partition("=")
        if kind == "cache" and sep:
            pipe.transformer.enable_cache(cache_config(value, pipe))
        elif kind == "compile" and sep:
            compile_transformer(pipe, value)
        else:
            raise ValueError(f"`--variants`: {part!r} is not none, cache=SPEC or compile=MODE.")
    return pipe


def sample(pipe, batch_size: int, num_inference_steps: int | None) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
    if isinstance(pipe, PixNerdT2IPipeline):
        prompts = [BUNDLED_T2I_PROMPTS[i % len(BUNDLED_T2I_PROMPTS)] for i in range(batch_size)]
        condition = {"prompt": prompts}
    else:
        condition = {"class_labels": [i % pipe.transformer.config.num_classes for i in range(batch_size)]}
    images = pipe(**condition, generator=generators, num_inference_steps=num_inference_steps, output_type="pt")
    return (images.images * 255).round()


def benchmark(args) -> list[dict]:
    pipes = {variant: prepare(args.model, variant) for variant in args.variants}
    first_call, images = {}, {}
    for variant, pipe in pipes.items():
        start = time.perf_counter()
        images[variant] = sample(pipe, args.batch_size, args.num_inference_steps)
        first_call[variant] = time.perf_counter() - start
        for _ in range(
            args.warmup
        ):  # e.g. a compiled model's one recompile once diffusers has added its hook registry
            sample(pipe, args.batch_size, args.num_inference_steps)
    times = {variant: [] for variant in pipes}
    for _ in range(args.repeats):
        for variant, pipe in pipes.items():
            start = time.perf_counter()
            sample(pipe, args.batch_size, args.num_inference_steps)
            times[variant].append(time.perf_counter() - start)
    baseline = args.variants[0]
    rows = []
    for variant in pipes:
        difference = (images[variant] - images[baseline]).abs()
        rows.append(
            dict(
                variant=variant,
                first_call_s=round(first_call[variant], 2),
                min_s=round(min(times[variant]), 3),
                speedup=round(min(times[baseline]) / min(times[variant]), 3),
                max_pixel_diff=difference.max().item(),
                mean_pixel_diff=round(difference.mean().item(), 3),
            )
        )
    return rows


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_MODEL, help="A pipeline folder, Hub repo id or official .ckpt.")
    parser.add_argument("--variants", nargs="+", default=["none", "cache=first_block:threshold=0.2"])
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the saved sampler's.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed calls after the first one.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--output", default=None, help="Also write the rows to this JSON file.")
    return parser.parse_args(input_args)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark(args)
    print(f"{'variant':48s} {'first call s':>12s} {'min s':>8s} {'speed-up':>9s} {'max diff':>9s} {'mean diff':>9s}")
    for row in rows:
        print(
            f"{row['variant']:48s} {row['first_call_s']:12.2f} {row['min_s']:8.3f} {row['speedup']:8.3f}x "
            f"{row['max_pixel_diff']:9.0f} {row['mean_pixel_diff']:9.3f}"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(args=vars(args), threads=torch.get_num_threads(), rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main(parse_args())
