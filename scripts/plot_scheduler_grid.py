"""Plot the sampling grid of PixNerdFlowMatchScheduler for a few shifts (docs/images/scheduler_grid.png).

Needs matplotlib, which is not a package dependency: `pip install matplotlib`.

    python scripts/plot_scheduler_grid.py --num_inference_steps 25
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from diffusers_pixnerd.schedulers import PixNerdFlowMatchScheduler  # noqa: E402


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--shifts", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    parser.add_argument(
        "--output", type=str, default=str(Path(__file__).resolve().parents[1] / "docs/images/scheduler_grid.png")
    )
    return parser.parse_args(input_args)


def main(args):
    fig, (ax_sigma, ax_grid) = plt.subplots(1, 2, figsize=(11, 4))
    for row, shift in enumerate(args.shifts):
        scheduler = PixNerdFlowMatchScheduler(shift=shift)
        scheduler.set_timesteps(args.num_inference_steps)
        sigmas = scheduler.sigmas.numpy()  # (N + 1,), 1 -> 0
        ax_sigma.plot(range(len(sigmas)), sigmas, marker=".", label=f"shift {shift:g}")
        ax_grid.plot(1 - sigmas, [row] * len(sigmas), "|", markersize=14, label=f"shift {shift:g}")

    ax_sigma.set(xlabel="step index i", ylabel="sigma_i  (1 = noise, 0 = data)")
    ax_sigma.set_title(f"sigmas of {args.num_inference_steps} steps")
    ax_sigma.legend()
    ax_grid.set(xlabel="paper time t = 1 - sigma  (0 = noise, 1 = data)", xlim=(-0.02, 1.02))
    ax_grid.set_yticks(range(len(args.shifts)), [f"shift {s:g}" for s in args.shifts])
    ax_grid.set_title("where the steps fall")
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=110)
    print(f"saved {args.output}")


if __name__ == "__main__":
    main(parse_args())
