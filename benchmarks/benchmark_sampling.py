"""Pipeline sampling time with diffusers' caches and torch.compile, side by side in one process.

    python benchmarks/benchmark_sampling.py --model models/pixnerd-fashion-mnist --batch_size 10 --repeats 3 \
        --variants none cache=first_block:threshold=0.2 cache=taylorseer:cache_interval=3 compile=regional

Every variant is its own copy of the pipeline (compiling and caching change the transformer in place) and samples
the same labels (or prompts) with the same seeds and the saved sampler. The variants' timed runs alternate (these
machines are noisy) and the minimum is reported, with the speed-up over the first variant and the largest and mean
pixel difference from its images (0-255 scale). The first call of each variant is timed apart (for `compile=` it
includes the compilation), then `--warmup` untimed calls. A variant is `none`, `cache=NAME[:key=value,...]` (the
`cache` of `load_pipeline`), `compile=regional|full`, or both joined by `+`
(`cache=first_block:threshold=0.2+compile=regional`). `--device cuda` samples on the GPU (timings wait for it).
Quality at scale (class accuracy, FID on >= 1,000 samples) is `examples/evaluate.py --cache ...`.
`benchmarks/gpu_checks.py` runs it on random pipelines of the official sizes (`build(args, device, make_pipeline)`).
"""

import argparse
import json
import os

import torch
from benchmark_transformer import timed  # beside this script

from diffusers_pixnerd import PixNerdT2IPipeline, load_pipeline
from diffusers_pixnerd.models import cache_config
from diffusers_pixnerd.pipelines import compile_transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED_MODEL = os.path.join(ROOT, "models", "pixnerd-fashion-mnist")
# Text-to-image prompts (those of `make demo`, examples/generate.py BUNDLED_T2I_PROMPTS).
PROMPTS = [
    "an image showing a dress",
    "here is a sneaker, centered",
    "a pair of trousers seen from the front",
    "clothing catalogue: a handbag",
    "a low-resolution shot of an ankle boot",
]


def variant_options(variant: str) -> dict:
    """`none`, `cache=SPEC`, `compile=MODE` or both joined by `+`, as `{"cache": SPEC, "compile": MODE}`."""
    options = {}
    for part in filter(lambda p: p != "none", variant.split("+")):
        kind, sep, value = part.partition("=")
        if kind not in ("cache", "compile") or not sep:
            raise ValueError(f"`--variants`: {part!r} is not none, cache=SPEC or compile=MODE.")
        options[kind] = value
    return options


def build(args, device: str = "cpu", make_pipeline=None) -> dict:
    """A fresh pipeline per variant (caching and compiling change the transformer in place), on `device`, with the
    variant's cache and compile mode: `make_pipeline()` if given (gpu_checks: random weights), else `args.model`."""
    pipes = {}
    for variant in args.variants:
        options = variant_options(variant)
        if make_pipeline is None:
            pipe = load_pipeline(args.model, dtype=torch.float32, device=device, **options)
        else:
            pipe = make_pipeline().to(device)
            if "cache" in options:
                pipe.transformer.enable_cache(cache_config(options["cache"], pipe))
            compile_transformer(pipe.transformer, options.get("compile"))
        pipe.set_progress_bar_config(disable=True)
        pipes[variant] = pipe
    return pipes


def sample(pipe, batch_size: int, num_inference_steps: int | None) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
    if isinstance(pipe, PixNerdT2IPipeline):
        condition = {"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]}
    else:
        condition = {"class_labels": [i % pipe.transformer.config.num_classes for i in range(batch_size)]}
    images = pipe(**condition, generator=generators, num_inference_steps=num_inference_steps, output_type="pt")
    return (images.images * 255).round()


def benchmark(args, pipes: dict | None = None, device: str = "cpu") -> list[dict]:
    """The rows of the variants' `pipes` (default: `build(args, device)`), timed on `device`."""
    pipes = pipes or build(args, device)
    first_call, images = {}, {}
    run = lambda pipe: sample(pipe, args.batch_size, args.num_inference_steps)  # noqa: E731
    for variant, pipe in pipes.items():
        output = []
        first_call[variant] = timed(lambda: output.append(run(pipe)), device)
        images[variant] = output[0].cpu()
        for _ in range(args.warmup):  # e.g. a compiled model's one recompile once diffusers has added its hook registry
            run(pipe)
    times = {variant: [] for variant in pipes}
    for _ in range(args.repeats):
        for variant, pipe in pipes.items():
            times[variant].append(timed(lambda: run(pipe), device))
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
    parser.add_argument("--device", default="cpu", help="Where the pipelines sample (default: the CPU).")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    parser.add_argument("--output", default=None, help="Also write the rows to this JSON file.")
    return parser.parse_args(input_args)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = benchmark(args, device=args.device)
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
