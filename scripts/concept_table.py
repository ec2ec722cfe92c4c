"""The concept-LoRA table of docs/results.md: for each run, the concept score of its samples with the concept word and
without it, per sample, against the training images' own score; and the class accuracy.

Each run was evaluated twice with `examples/evaluate.py --lora outputs/<run> --num_samples 200` into
`outputs/eval_<run>_blue` (the held-out wordings with "blue": `fashion_mnist.py prompts --prefix blue`) and
`outputs/eval_<run>_plain` (the same without the word). The score is blueness (`fashion_mnist.blueness`: the mean
B - (R + G) / 2 over the garment pixels, 0 for gray images). Targets: with the word, a mean of at least 80% of the
training images' score; without it, a mean under 5% of it, and the samples above that 5% counted.

    python scripts/concept_table.py --runs blue_reg blue_te blue_te_r1
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import fashion_mnist  # noqa: E402


def per_sample(folder: str) -> np.ndarray:
    """The blueness of each sample of an evaluate.py folder."""
    samples = np.load(os.path.join(folder, "samples.npz"))
    images = samples[samples.files[0]]
    return np.array([fashion_mnist.blueness(image[None]) for image in images])


def training_score(folder: str) -> float:
    """The mean blueness of the training images (the PNGs under `folder`)."""
    scores = []
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(".png"):
                image = np.asarray(Image.open(os.path.join(root, name)).convert("RGB"))
                scores.append(fashion_mnist.blueness(image[None]))
    return float(np.mean(scores))


def main(args):
    reference = training_score(args.training_images)
    print(f"training images: blueness {reference:.3f}; targets: with the word >= {0.8 * reference:.3f}, "
          f"without it < {0.05 * reference:.3f}")  # fmt: skip
    print(
        "| run | with the word: blueness (% of training) | class acc. | without: blueness | leaking samples | class acc. |"
    )
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        folders = [os.path.join(args.output_dir, f"eval_{run}_{s}") for s in ("blue", "plain")]
        if not all(os.path.isfile(os.path.join(f, "metrics.json")) for f in folders):
            print(f"| {run} | (not evaluated) |||||")
            continue
        blue, plain = (per_sample(f) for f in folders)
        accuracy = [json.load(open(os.path.join(f, "metrics.json")))["class_accuracy"] for f in folders]
        leaks = int((plain >= 0.05 * reference).sum())
        print(f"| {run} | {blue.mean():.3f} ({100 * blue.mean() / reference:.0f}%) | {100 * accuracy[0]:.1f}% | "
              f"{plain.mean():.3f} ({100 * plain.mean() / reference:.1f}%) | {leaks}/{len(plain)} | "
              f"{100 * accuracy[1]:.1f}% |")  # fmt: skip


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--training_images", default="data/fashion-mnist-blue/blue")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
