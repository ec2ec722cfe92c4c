"""The concept-LoRA tables of docs/results.md: for each run, the concept score of its samples with the concept word and
without it, per sample, against the training images' own score; and the class accuracy.

Each run was evaluated twice with `examples/evaluate.py --lora outputs/<run> --num_samples 200` into
`outputs/eval_<run>_<concept>` (the held-out wordings with the word: `fashion_mnist.py prompts --prefix <word>`) and
`outputs/eval_<run>_plain` (the same without it). The score is the concept's own (`fashion_mnist.CONCEPTS`): blueness
(B - (R + G) / 2 over the garment), checkeredness (the checkerboard's contrast in its phase) or inversion (the
brightness of the image's frame). Targets: with the word, a mean of at least 80% of the training images' score;
without it, a mean under 5% of it, and the samples above that 5% counted. The class accuracy is the reference
classifier's on the samples, after undoing the look where it hides the garment (the inverted one).

    python scripts/concept_table.py --concept blue --runs blue_reg blue_te blue_te_r1

`--by_wording` then counts each run's leaking samples by held-out wording (`fashion_mnist.HELDOUT_TEMPLATES`, the
prompts of `--plain_prompts`).

`--background` adds the brightness of the samples' 2-pixel frame with the word (`fashion_mnist.inversion`; 0 on
the black background of Fashion-MNIST): the masked-loss example, whose training images have coloured backgrounds.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import fashion_mnist  # noqa: E402


def samples(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """The samples (N, H, W, 3) uint8 of an evaluate.py folder and their prompts' classes."""
    data = np.load(os.path.join(folder, "samples.npz"))
    return data[data.files[0]], data[data.files[1]]


def training_images(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """The training images (N, H, W, 3) uint8 of a `fashion_mnist.py concept` folder and their classes."""
    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    images = [np.asarray(Image.open(os.path.join(folder, row["file_name"])).convert("RGB")) for row in rows]
    return np.stack(images), np.array([row["label"] for row in rows])


def class_accuracy(classifier, images: np.ndarray, labels: np.ndarray, undo) -> float:
    """The reference classifier's accuracy on `images` (after `undo`, if any)."""
    images = undo(images) if undo is not None else images
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    return float((fashion_mnist.predict(classifier, x) == torch.from_numpy(labels)).float().mean())


def frame(images: np.ndarray) -> float:
    """The mean brightness of the images' 2-pixel frame (their background)."""
    return float(np.mean([fashion_mnist.inversion(image[None]) for image in images]))


def wording(prompt: str) -> str:
    """The held-out template a prompt was made from ("clothing catalogue: {}")."""
    for template in fashion_mnist.HELDOUT_TEMPLATES:
        head, tail = template.split("{}")
        if prompt.startswith(head) and prompt.endswith(tail):
            return template
    return "other"


def main(args):
    concept = fashion_mnist.CONCEPTS[args.concept]
    score, word = concept["score"], concept["word"]
    images, labels = training_images(args.training_images or f"data/fashion-mnist-{args.concept}/{args.concept}")
    reference = float(np.mean([score(image[None]) for image in images]))
    classifier = fashion_mnist.load_classifier(args.classifier)
    accuracy = class_accuracy(classifier, images, labels, concept["undo"])
    print(f"training images: {score.__name__} {reference:.3f}, class acc. {100 * accuracy:.1f}%"
          + (f", background {frame(images):.3f}" if args.background else "") + f"; targets: with the word >= "
          f"{0.8 * reference:.3f}, without it < {0.05 * reference:.3f}")  # fmt: skip
    article = "an" if word[0] in "aeiou" else "a"
    print(f"| run | \"{article} {word} X\": {score.__name__} (% of training) | class acc. | \"a X\": {score.__name__} "
          "(% of training) | leaking samples | class acc. |" + (" background, with the word |" if args.background
          else ""))  # fmt: skip
    print("|---|---|---|---|---|---|" + ("---|" if args.background else ""))
    by_wording = []
    for run in args.runs:
        folders = [os.path.join(args.output_dir, f"eval_{run}_{s}") for s in (args.concept, "plain")]
        if not all(os.path.isfile(os.path.join(f, "samples.npz")) for f in folders):
            print(f"| {run} | (not evaluated) |||||")
            continue
        (with_word, with_labels), (plain, plain_labels) = (samples(f) for f in folders)
        with_scores = np.array([score(image[None]) for image in with_word])
        plain_scores = np.array([score(image[None]) for image in plain])
        accuracy = [
            class_accuracy(classifier, with_word, with_labels, concept["undo"]),
            class_accuracy(classifier, plain, plain_labels, None),
        ]
        leaks = int((plain_scores >= 0.05 * reference).sum())
        print(f"| {run} | {with_scores.mean():.3f} ({100 * with_scores.mean() / reference:.0f}%) | "
              f"{100 * accuracy[0]:.1f}% | {plain_scores.mean():.3f} ({100 * plain_scores.mean() / reference:.1f}%) "
              f"| {leaks}/{len(plain_scores)} | {100 * accuracy[1]:.1f}% |" + (f" {frame(with_word):.3f} |"
              if args.background else ""))  # fmt: skip
        if args.by_wording:
            with open(args.plain_prompts, encoding="utf-8") as f:
                prompts = [json.loads(line)["prompt"] for line in f][: len(plain_scores)]
            counts = {}
            for prompt, value in zip(prompts, plain_scores):
                total, leaking = counts.get(wording(prompt), (0, 0))
                counts[wording(prompt)] = (total + 1, leaking + int(value >= 0.05 * reference))
            by_wording.append((run, counts))
    for run, counts in by_wording:
        print(f"{run}: leaking by wording: " + ", ".join(f"{t!r} {n}/{total}" for t, (total, n) in counts.items()))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=sorted(fashion_mnist.CONCEPTS), default="blue")
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--output_dir", default="outputs")
    parser.add_argument("--training_images", default=None, help="Default: data/fashion-mnist-<concept>/<concept>.")
    parser.add_argument("--classifier", default="models/fashion-mnist-classifier.safetensors")
    parser.add_argument("--by_wording", action="store_true", help="Count the leaking samples by held-out wording.")
    parser.add_argument("--plain_prompts", default="data/plain_prompts.jsonl", help="The prompts without the word.")
    parser.add_argument("--background", action="store_true", help="Add the background brightness with the word.")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
