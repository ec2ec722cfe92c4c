"""Run the official PixNerd samplers on a fake network and save their trajectories as golden fixtures.

tests/schedulers/test_scheduling_pixnerd.py replays the same runs through `PixNerdFlowMatchScheduler` with the
`fake_network` defined here, and compares. The official code is
imported from a checkout that is never committed (github MCG-NJU/PixNerd, commit 6da060b):

    python scripts/generate_scheduler_fixtures.py --official_repo /tmp/official
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4

# name -> official sampler settings: CFG 3.5 on a non-trivial interval and shift, and edge cases at shift 1, where the
# 10-step grid has t_1 = 0.099999994 just below 0.1 and t_7 = float32(0.7) on the upper edge.
RUNS = {
    "euler": dict(sampler="euler", solver_order=1, num_inference_steps=10, shift=3.0, interval=(0.1, 1.0)),
    "adams2": dict(sampler="adams", solver_order=2, num_inference_steps=10, shift=3.0, interval=(0.1, 1.0)),
    "adams3": dict(sampler="adams", solver_order=3, num_inference_steps=10, shift=3.0, interval=(0.1, 1.0)),
    "euler_edges": dict(sampler="euler", solver_order=1, num_inference_steps=10, shift=1.0, interval=(0.1, 0.7)),
    "adams2_edges": dict(sampler="adams", solver_order=2, num_inference_steps=10, shift=1.0, interval=(0.1, 0.7)),
}
GUIDANCE_SCALE = 3.5


def fake_network(x, t, y, weight, class_emb):
    """A stand-in denoiser in the official convention: t (B,) from 0 (noise) to 1 (data), returns x0 - noise."""
    t = t.view(-1, 1, 1, 1)
    mixed = torch.einsum("oc,bchw->bohw", weight, x)  # a fixed 1x1 convolution, so the velocity depends on x
    return torch.tanh(mixed) * (1 + t) - x * (1 - 0.5 * t) + torch.cos(3 * t) * class_emb[y][:, :, None, None]


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official_repo", type=str, required=True, help="A checkout of github.com/MCG-NJU/PixNerd.")
    parser.add_argument("--output", type=str, default=str(ROOT / "tests/fixtures/official_sampler.safetensors"))
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


def main(args):
    # The sampler modules import only torch and each other, so no stubs are needed.
    sys.path.insert(0, args.official_repo)
    from src.diffusion.base.guidance import simple_guidance_fn
    from src.diffusion.flow_matching.adam_sampling import AdamLMSampler
    from src.diffusion.flow_matching.sampling import EulerSampler
    from src.diffusion.flow_matching.scheduling import LinearScheduler

    generator = torch.Generator().manual_seed(args.seed)
    tensors = {
        "weight": torch.randn(3, 3, generator=generator) / 3**0.5,
        "class_emb": torch.randn(NUM_CLASSES + 1, 3, generator=generator),
        "noise": torch.randn(2, 3, 8, 8, generator=generator),
        "class_labels": torch.tensor([1, 3]),
    }
    condition = tensors["class_labels"]
    uncondition = torch.full_like(condition, NUM_CLASSES)  # the null class, as in the official C2I model

    def net(x, t, y):  # official convention: t in [0, 1] from noise to data, returns x0 - noise
        return fake_network(x, t, y, tensors["weight"], tensors["class_emb"])

    for name, run in RUNS.items():
        kwargs = dict(
            scheduler=LinearScheduler(),
            guidance_fn=simple_guidance_fn,
            num_steps=run["num_inference_steps"],
            guidance=GUIDANCE_SCALE,
            timeshift=run["shift"],
            guidance_interval_min=run["interval"][0],
            guidance_interval_max=run["interval"][1],
        )
        sampler = (
            EulerSampler(**kwargs) if run["sampler"] == "euler" else AdamLMSampler(order=run["solver_order"], **kwargs)
        )
        with torch.no_grad():
            _, trajectory = sampler(net, tensors["noise"], condition, uncondition, return_x_trajs=True)
        tensors[f"{name}.trajectory"] = torch.stack(trajectory).contiguous()  # (N + 1, B, C, H, W), noise first
        print(f"{name}: final sample mean {trajectory[-1].mean():.6f} std {trajectory[-1].std():.6f}")

    metadata = {"runs": json.dumps(RUNS), "guidance_scale": str(GUIDANCE_SCALE), "official_commit": "6da060b"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.output, metadata=metadata)
    print(f"saved {args.output} ({Path(args.output).stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main(parse_args())
