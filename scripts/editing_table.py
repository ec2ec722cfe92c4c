"""The editing measurements of docs/results.md: inpainting, repainting, image-to-image and outpainting with the bundled
class-conditional and text-to-image models on held-out Fashion-MNIST test images (never trained on), judged by the
reference classifier.

Rows, each for both models, on the test images `--first` to `--first + --num - 1` (each with its own label):
- inpaint half: one half of the image (left, right, top or bottom, in turn) repainted as the image's own class.
- repaint interior: the central 24x24 (and 20x20) pixels repainted as another class (label + 1 + i % 9, never the
  image's own); the border kept (4 or 6 pixels: the 2-pixel padding and 2 or 4 pixels of the 28x28 image); for the
  class-conditional model also at CFG 5 (its default is 3.5, the text model's 5).
- img2img: strength 0.2 ... 1.0 towards another class (as above); change from the input and both classes' accuracy.
- outpaint: the image widened to 64x32 (kept on the left), the new right half painted as the image's class.
Text prompts use the held-out wordings (`fashion_mnist.HELDOUT_TEMPLATES`, none of them a training caption). Sample i is
seeded with i. Each row's numbers are written to `--output_dir/<row>.json` and read back instead of run again, so
the script can be stopped and started again; `--output_dir/table.md` is the table, and the picture grids go to
`--image_dir`.

    OMP_NUM_THREADS=1 python scripts/editing_table.py --output_dir outputs/editing
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

from diffusers_pixnerd import (  # noqa: E402
    PixNerdImg2ImgPipeline,
    PixNerdInpaintPipeline,
    PixNerdT2IImg2ImgPipeline,
    PixNerdT2IInpaintPipeline,
    load_pipeline,
)

MODELS = {"class-conditional": "models/pixnerd-fashion-mnist", "text-to-image": "models/pixnerd-t2i-fashion-mnist"}
CLASSIFIER = "models/fashion-mnist-classifier.safetensors"
STRENGTHS = (0.2, 0.4, 0.6, 0.8, 1.0)
SIZE = 32


def half_mask(i: int) -> np.ndarray:
    """The half repainted in sample i: left, right, top, bottom in turn (1 = repaint)."""
    mask = np.zeros((SIZE, SIZE), np.float32)
    half = SIZE // 2
    [lambda m: m[:, :half], lambda m: m[:, half:], lambda m: m[:half], lambda m: m[half:]][i % 4](mask)[...] = 1
    return mask


def interior_mask(side: int) -> np.ndarray:
    """The central `side` x `side` pixels (1 = repaint)."""
    mask = np.zeros((SIZE, SIZE), np.float32)
    border = (SIZE - side) // 2
    mask[border : border + side, border : border + side] = 1
    return mask


def other_label(label: int, i: int) -> int:
    return (label + 1 + i % 9) % 10


def condition(kind: str, labels: list[int], rng: np.random.Generator) -> dict:
    """The call's condition for `labels`: class ids, or prompts in the held-out wordings."""
    if kind == "class-conditional":
        return {"class_labels": labels}
    return {"prompt": [fashion_mnist.caption(c, rng, fashion_mnist.HELDOUT_TEMPLATES) for c in labels]}


def run_batches(pipe, kind, images, labels, batch_size, seed_offset=0, **call) -> np.ndarray:
    """uint8 (N, H, W, 3) outputs of `pipe` for each image with its label's condition; `call` items that are lists of
    one entry per image are split into batches like the images."""
    outputs = []
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        rng = np.random.default_rng(seed_offset + start)
        extra = {k: (v[start:stop] if isinstance(v, list) else v) for k, v in call.items()}
        generators = [torch.Generator().manual_seed(seed_offset + i) for i in range(start, stop)]
        out = pipe(
            **condition(kind, labels[start:stop], rng),
            image=[Image.fromarray(a).convert("RGB") for a in images[start:stop]],
            generator=generators,
            output_type="np",
            **extra,
        ).images
        outputs.append(np.round(out * 255).astype(np.uint8))
    return np.concatenate(outputs)


def accuracy(classifier, images_rgb: np.ndarray, labels) -> float:
    gray = images_rgb.astype(np.float32).mean(-1).round().astype(np.uint8)
    return fashion_mnist.accuracy(classifier, fashion_mnist.to_model_input(gray), torch.as_tensor(labels))


def measure(row: str, kind: str, pipe, images, labels, classifier, args) -> tuple[dict, np.ndarray]:
    """One row's numbers and its output images."""
    n = len(images)
    inputs_rgb = np.repeat(images[..., None], 3, -1)
    if row == "inpaint half":
        edit = PixNerdInpaintPipeline if kind == "class-conditional" else PixNerdT2IInpaintPipeline
        masks = [half_mask(i) for i in range(n)]
        out = run_batches(edit.from_pipe(pipe), kind, images, labels, args.batch_size, mask_image=masks)
        kept = [bool((out[i][masks[i] == 0] == inputs_rgb[i][masks[i] == 0]).all()) for i in range(n)]
        erased = inputs_rgb * (1 - np.stack(masks)[..., None]).astype(np.uint8)
        return {
            "accuracy": accuracy(classifier, out, labels),
            "accuracy of the inputs": accuracy(classifier, inputs_rgb, labels),
            "accuracy of the inputs, half erased": accuracy(classifier, erased, labels),
            "kept half byte-identical": f"{sum(kept)}/{n}",
        }, out
    if row.startswith("repaint interior"):
        edit = PixNerdInpaintPipeline if kind == "class-conditional" else PixNerdT2IInpaintPipeline
        targets = [other_label(c, i) for i, c in enumerate(labels)]
        mask = interior_mask(int(row.split()[2].split("x")[0]))
        extra = {"guidance_scale": 5.0} if row.endswith("CFG 5") else {}
        out = run_batches(edit.from_pipe(pipe), kind, images, targets, args.batch_size, mask_image=mask, **extra)
        kept = [bool((out[i][mask == 0] == inputs_rgb[i][mask == 0]).all()) for i in range(n)]
        return {
            "accuracy (new class)": accuracy(classifier, out, targets),
            "accuracy (old class)": accuracy(classifier, out, labels),
            "border byte-identical": f"{sum(kept)}/{n}",
        }, out
    if row.startswith("img2img"):
        strength = float(row.split()[-1])
        edit = PixNerdImg2ImgPipeline if kind == "class-conditional" else PixNerdT2IImg2ImgPipeline
        targets = [other_label(c, i) for i, c in enumerate(labels)]
        out = run_batches(edit.from_pipe(pipe), kind, images, targets, args.batch_size, strength=strength)
        return {
            "mean |change| (0-255)": float(np.abs(out.astype(np.float32) - inputs_rgb).mean()),
            "accuracy (input's class)": accuracy(classifier, out, labels),
            "accuracy (prompt's class)": accuracy(classifier, out, targets),
        }, out
    if row == "outpaint 64x32":
        edit = PixNerdInpaintPipeline if kind == "class-conditional" else PixNerdT2IInpaintPipeline
        out = run_batches(
            edit.from_pipe(pipe), kind, images, labels, args.batch_size, width=2 * SIZE, image_offset=(0, 0)
        )
        new = out[:, :, SIZE:]
        kept = [bool((out[i, :, :SIZE] == inputs_rgb[i]).all()) for i in range(n)]
        bright = (new.max(-1) > 20).mean(axis=(1, 2))  # the share of garment pixels in the new half
        return {
            "kept half byte-identical": f"{sum(kept)}/{n}",
            "new half: mean brightness (0-255)": float(new.mean()),
            "new half: images with >= 5% garment pixels": f"{int((bright >= 0.05).sum())}/{n}",
            "new half: accuracy (image's class)": accuracy(classifier, new, labels),
            "inputs: mean brightness (0-255)": float(inputs_rgb.mean()),
        }, out
    raise ValueError(row)


def save_grid(path: str, columns: list[np.ndarray], scale: int = 3):
    """Columns of uint8 (N, H, W, 3) images side by side (each column's images one under another)."""
    rows = [np.concatenate([c[i] for c in columns], axis=1) for i in range(len(columns[0]))]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST).save(path)


def main(args):
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    os.makedirs(args.output_dir, exist_ok=True)
    os.makedirs(args.image_dir, exist_ok=True)
    images, labels = fashion_mnist.load_split("test", args.data_dir)
    images, labels = images[args.first : args.first + args.num], labels[args.first : args.first + args.num].tolist()
    classifier = fashion_mnist.load_classifier(os.path.join(ROOT, CLASSIFIER))
    rows = [
        "inpaint half",
        "repaint interior 24x24",
        "repaint interior 20x20",
        *(f"img2img {s}" for s in STRENGTHS),
        "outpaint 64x32",
    ]
    results, sweep = {}, {}
    for kind, model in MODELS.items():
        pipe = load_pipeline(os.path.join(ROOT, model), dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        for row in rows + (["repaint interior 24x24, CFG 5"] if kind == "class-conditional" else []):
            path = os.path.join(args.output_dir, f"{kind}_{row.replace(' ', '_')}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    results[(kind, row)] = json.load(f)
                continue
            metrics, out = measure(row, kind, pipe, images, labels, classifier, args)
            metrics["samples"] = len(images)
            with open(path + ".tmp", "w") as f:
                json.dump(metrics, f, indent=2)
            os.replace(path + ".tmp", path)
            np.save(os.path.join(args.output_dir, f"{kind}_{row.replace(' ', '_')}.npy"), out[: args.grid])
            results[(kind, row)] = metrics
            print(kind, row, metrics, flush=True)
        outs = {r: np.load(os.path.join(args.output_dir, f"{kind}_{r.replace(' ', '_')}.npy")) for r in rows}
        inputs = np.repeat(images[: args.grid, ..., None], 3, -1)
        slug = "c2i" if kind == "class-conditional" else "t2i"
        sweep[kind] = [inputs] + [outs[f"img2img {s}"] for s in STRENGTHS]
        save_grid(os.path.join(args.image_dir, f"editing_{slug}_img2img.png"), sweep[kind])
        masks = np.stack([half_mask(i) for i in range(args.grid)])[..., None]
        save_grid(
            os.path.join(args.image_dir, f"editing_{slug}_inpaint.png"),
            [inputs, (inputs * (1 - masks)).astype(np.uint8), outs["inpaint half"], outs["repaint interior 24x24"]],
        )
        outpaint = outs["outpaint 64x32"]
        save_grid(os.path.join(args.image_dir, f"editing_{slug}_outpaint.png"), [outpaint])
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        for (kind, row), metrics in results.items():
            f.write(f"| {kind} | {row} | " + "; ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                     for k, v in metrics.items()) + " |\n")  # fmt: skip
    print(open(os.path.join(args.output_dir, "table.md")).read())


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/editing")
    parser.add_argument(
        "--image_dir", default="docs/images", help="Where the picture grids go (default: %(default)s)."
    )
    parser.add_argument("--data_dir", default=fashion_mnist.DATA_DIR)
    parser.add_argument("--first", type=int, default=5000, help="First test image (default: %(default)s).")
    parser.add_argument("--num", type=int, default=200, help="Test images per row (default: %(default)s).")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--grid", type=int, default=8, help="Images per picture grid (default: %(default)s).")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
