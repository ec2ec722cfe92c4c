"""Full CFG sampling: our PixNerdPipeline vs the official Adams-2 sampler and model, same weights, side by side.

    python benchmarks/benchmark_official_sampling.py --official_repo /path/to/MCG-NJU/PixNerd \
        --config fashion-mnist --batch_size 10 --num_inference_steps 50 --repeats 3

The official class-conditional model (`pixnerd_c2i.py`) gets random weights (its zero-initialised final layer too);
ours is converted from its state dict (`convert_state_dict`). Both sample the same noise and labels with the same
settings: the official `AdamLMSampler` (order 2, `LinearScheduler`, `simple_guidance_fn`) called as the official
trainer calls it, and our pipeline with `PixNerdFlowMatchScheduler(solver_order=2)`. The runs alternate (these
machines are noisy); the minimum is reported with the ratio official / ours (> 1: ours is faster) and
`max|ours - official| / max|official|` of the final pixels. `--config fashion-mnist` is the bundled model's size
(32x32, patch 4, 6 blocks of 128); `PixNerd-L/16` and `PixNerd-XL/16` are the official sizes at 256x256.
"""

import argparse
import json
import os
import sys

import torch
from benchmark_transformer import timed  # beside this script

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.loaders import convert_state_dict, infer_config

# Official constructor arguments of each size (`pixnerd_c2i.py` PixNerDiT) and the image side.
CONFIGS = {
    "fashion-mnist": dict(
        official=dict(hidden_size=128, num_groups=2, patch_size=4, hidden_size_x=16, num_blocks=8, num_cond_blocks=6),
        num_classes=10,
        resolution=32,
    ),
    "PixNerd-L/16": dict(
        official=dict(
            hidden_size=1024, num_groups=16, patch_size=16, hidden_size_x=64, num_blocks=24, num_cond_blocks=22
        ),
        num_classes=1000,
        resolution=256,
    ),
    "PixNerd-XL/16": dict(
        official=dict(
            hidden_size=1152, num_groups=16, patch_size=16, hidden_size_x=64, num_blocks=30, num_cond_blocks=26
        ),
        num_classes=1000,
        resolution=256,
    ),
}


@torch.no_grad()
def build(args, device: str = "cpu"):
    """(run_ours, run_official, pipe): the two samplers on `device` with the same weights, noise and labels. Both are
    made on the CPU (the noise from a CPU generator, so every device samples the same noise), then moved."""
    sys.path.insert(0, os.path.abspath(args.official_repo))
    from src.diffusion.base.guidance import simple_guidance_fn
    from src.diffusion.flow_matching.adam_sampling import AdamLMSampler
    from src.diffusion.flow_matching.scheduling import LinearScheduler
    from src.models.transformer.pixnerd_c2i import PixNerDiT

    spec = CONFIGS[args.config]
    torch.manual_seed(0)
    official = PixNerDiT(in_channels=3, nerf_mlpratio=2, num_classes=spec["num_classes"], **spec["official"])
    torch.nn.init.normal_(official.final_layer.linear.weight, std=0.02)  # zero-initialised officially
    state_dict = official.state_dict()
    config = infer_config(state_dict, spec["resolution"])
    transformer = PixNerdTransformer2DModel(**config)
    transformer.load_state_dict(convert_state_dict(state_dict, config))
    interval = tuple(args.guidance_interval)
    scheduler = PixNerdFlowMatchScheduler(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval_min=interval[0],
        guidance_interval_max=interval[1],
        shift=args.shift,
        solver_order=2,
    )
    pipe = PixNerdPipeline(transformer=transformer.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    sampler = AdamLMSampler(
        order=2,
        scheduler=LinearScheduler(),
        guidance_fn=simple_guidance_fn,
        num_steps=args.num_inference_steps,
        guidance=args.guidance_scale,
        timeshift=args.shift,
        guidance_interval_min=interval[0],
        guidance_interval_max=interval[1],
    )
    noise = torch.randn(
        args.batch_size, 3, spec["resolution"], spec["resolution"], generator=torch.Generator().manual_seed(0)
    ).to(device)
    labels = torch.arange(args.batch_size, device=device) % spec["num_classes"]
    null = torch.full_like(labels, spec["num_classes"])
    for module in (pipe, official, sampler):
        if isinstance(module, (torch.nn.Module, PixNerdPipeline)):  # the official sampler may hold buffers
            module.to(device)
    run_ours = lambda: pipe(class_labels=labels, latents=noise.clone(), output_type="latent").images  # noqa: E731
    run_official = lambda: sampler(official.eval(), noise.clone(), labels, null)  # noqa: E731
    return run_ours, run_official, pipe


@torch.no_grad()
def compare(run_ours, run_official, repeats: int, device: str = "cpu") -> dict:
    """Both samplers once (warm-up, and the samples compared), then `repeats` alternating timed runs of each."""
    ours, official = run_ours(), run_official()
    official = official[0] if isinstance(official, (tuple, list)) else official
    max_rel_diff = ((ours - official).abs().max() / official.abs().max()).item()
    times = {"ours": [], "official": []}
    for _ in range(repeats):
        for name, run in (("ours", run_ours), ("official", run_official)):
            times[name].append(timed(run, device))
    best = {name: min(values) for name, values in times.items()}
    return dict(
        ours_s=round(best["ours"], 3),
        official_s=round(best["official"], 3),
        official_over_ours=round(best["official"] / best["ours"], 3),
        max_rel_diff=max_rel_diff,
        threads=torch.get_num_threads(),
    )


def benchmark(args) -> dict:
    run_ours, run_official, _ = build(args, args.device)
    return compare(run_ours, run_official, args.repeats, args.device)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official_repo", required=True, help="A checkout of github MCG-NJU/PixNerd.")
    parser.add_argument("--config", default="fashion-mnist", choices=sorted(CONFIGS))
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--guidance_scale", type=float, default=3.5)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=(0.1, 1.0), metavar=("MIN", "MAX"))
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="Where both sample (default: the CPU).")
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(input_args)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    result = benchmark(args)
    print(json.dumps({**vars(args), **result}, indent=2))
    return result


if __name__ == "__main__":
    main(parse_args())
