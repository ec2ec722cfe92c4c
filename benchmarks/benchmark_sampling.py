"""Pipeline sampling time with diffusers' caches, torch.compile, other samplers and few-step LoRAs, side by side in
one process.

    python benchmarks/benchmark_sampling.py --model models/pixnerd-fashion-mnist --batch_size 10 --repeats 3 \
        --variants none cache=first_block:threshold=0.2 cache=taylorseer:cache_interval=3 compile=regional

    python benchmarks/benchmark_sampling.py --model models/pixnerd-t2i-fashion-mnist --batch_size 40 --variants none \
        preset=t2i lora=models/pixnerd-t2i-fashion-mnist-turbo-lora lora=models/pixnerd-t2i-fashion-mnist-turbo-lora+steps=2

Every variant is its own copy of the pipeline (compiling and caching change the transformer in place) and samples
the same labels (or prompts) with the same seeds and the saved sampler. The variants' timed runs alternate (these
machines are noisy) and the minimum is reported, with the speed-up over the first variant and the largest and mean
pixel difference from its images (0-255 scale). The first call of each variant is timed apart (for `compile=` it
includes the compilation), then `--warmup` untimed calls. A variant is `none` or parts joined by `+`:
`cache=NAME[:key=value,...]` (the `cache` of `load_pipeline`), `compile=regional|full`, `lora=PATH` (a few-step
LoRA's sampler becomes the default, as in `load_pipeline`), `preset=NAME` (an official sampler,
`PixNerdFlowMatchScheduler.from_official_preset`), `fuse=1` (`fuse_lora()`: the LoRA folded into the weights),
`steps=N`, `guidance=G` (the call's `num_inference_steps`,
`guidance_scale`), e.g. `cache=first_block:threshold=0.2+compile=regional`. Each row also counts the transformer
calls of one sampling and the images they were batched over. `--device cuda` samples on the GPU (timings wait for it).
Quality at scale (class accuracy, FID on >= 1,000 samples) is `examples/evaluate.py --cache ...`.
`benchmarks/gpu_checks.py` runs it on random pipelines of the official sizes (`build(args, device, make_pipeline)`).
"""

import argparse
import functools
import json
import os

import torch
from benchmark_transformer import timed  # beside this script

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdT2IPipeline, load_pipeline
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


VARIANT_PARTS = ("cache", "compile", "lora", "fuse", "preset", "steps", "guidance")


def variant_options(variant: str) -> dict:
    """`none` or parts `KIND=VALUE` joined by `+` (`VARIANT_PARTS`), as `{"cache": SPEC, "steps": "4", ...}`."""
    options = {}
    for part in filter(lambda p: p != "none", variant.split("+")):
        kind, sep, value = part.partition("=")
        if kind not in VARIANT_PARTS or not sep:
            raise ValueError(f"`--variants`: {part!r} is not none or one of {', '.join(k + '=...' for k in VARIANT_PARTS)}.")
        options[kind] = value
    return options


def call_options(variant: str) -> dict:
    """The call arguments a variant sets: `steps=` and `guidance=`."""
    options = variant_options(variant)
    kwargs = {}
    if "steps" in options:
        kwargs["num_inference_steps"] = int(options["steps"])
    if "guidance" in options:
        kwargs["guidance_scale"] = float(options["guidance"])
    return kwargs


def build(args, device: str = "cpu", make_pipeline=None) -> dict:
    """A fresh pipeline per variant (caching and compiling change the transformer in place), on `device`, with the
    variant's cache and compile mode: `make_pipeline()` if given (gpu_checks: random weights), else `args.model`."""
    pipes = {}
    for variant in args.variants:
        options = variant_options(variant)
        preset = options.pop("preset", None)
        fuse = options.pop("fuse", None) == "1"
        load_options = {k: v for k, v in options.items() if k in ("cache", "compile", "lora")}
        if make_pipeline is None:
            pipe = load_pipeline(args.model, dtype=torch.float32, device=device, **load_options)
        else:
            pipe = make_pipeline().to(device)
            if "cache" in options:
                pipe.transformer.enable_cache(cache_config(options["cache"], pipe))
            compile_transformer(pipe.transformer, options.get("compile"))
        if preset is not None:
            pipe.scheduler = PixNerdFlowMatchScheduler.from_official_preset(preset)
        if fuse:
            pipe.fuse_lora()
        pipe.set_progress_bar_config(disable=True)
        pipes[variant] = pipe
    return pipes


def sample(pipe, batch_size: int, **call_kwargs) -> torch.Tensor:
    generators = [torch.Generator().manual_seed(i) for i in range(batch_size)]
    if isinstance(pipe, PixNerdT2IPipeline):
        condition = {"prompt": [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]}
    else:
        condition = {"class_labels": [i % pipe.transformer.config.num_classes for i in range(batch_size)]}
    images = pipe(**condition, generator=generators, output_type="pt", **call_kwargs)
    return (images.images * 255).round()


def count_calls(pipe, run) -> tuple[int, int]:
    """(transformer calls, images they were batched over) of one `run()`."""
    batches = []
    handle = pipe.transformer.register_forward_pre_hook(lambda module, inputs: batches.append(inputs[0].shape[0]))
    try:
        run()
    finally:
        handle.remove()
    return len(batches), sum(batches)


def benchmark(args, pipes: dict | None = None, device: str = "cpu") -> list[dict]:
    """The rows of the variants' `pipes` (default: `build(args, device)`), timed on `device`."""
    pipes = pipes or build(args, device)
    first_call, images, calls = {}, {}, {}
    runs = {
        variant: functools.partial(
            sample, pipe, args.batch_size, **{"num_inference_steps": args.num_inference_steps, **call_options(variant)}
        )
        for variant, pipe in pipes.items()
    }
    for variant, pipe in pipes.items():
        output = []
        first_call[variant] = timed(lambda output=output, run=runs[variant]: output.append(run()), device)
        images[variant] = output[0].cpu()
        for _ in range(args.warmup):  # e.g. a compiled model's one recompile once diffusers has added its hook registry
            runs[variant]()
        calls[variant] = count_calls(pipe, runs[variant])
    times = {variant: [] for variant in pipes}
    for _ in range(args.repeats):
        for variant in pipes:
            times[variant].append(timed(runs[variant], device))
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
                transformer_calls=calls[variant][0],
                images_through_transformer=calls[variant][1],
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
    print(
        f"{'variant':48s} {'first call s':>12s} {'min s':>8s} {'speed-up':>9s} {'max diff':>9s} {'mean diff':>9s} "
        f"{'calls':>6s} {'images':>7s}"
    )
    for row in rows:
        print(
            f"{row['variant']:48s} {row['first_call_s']:12.2f} {row['min_s']:8.3f} {row['speedup']:8.3f}x "
            f"{row['max_pixel_diff']:9.0f} {row['mean_pixel_diff']:9.3f} {row['transformer_calls']:6d} "
            f"{row['images_through_transformer']:7d}"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(dict(args=vars(args), threads=torch.get_num_threads(), rows=rows), f, indent=2)
    return rows


if __name__ == "__main__":
    main(parse_args())
