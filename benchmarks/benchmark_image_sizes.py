"""How long `--aspect_ratio_buckets` takes to read the image sizes up front: headers only, against full decoding.

    python benchmarks/benchmark_image_sizes.py --num_images 2000 --threads 1 8

Writes `--num_images` JPEGs of random sizes (200-800 px a side, smooth gradients) into a class folder under a
temporary directory (or `--folder`, reused if it already holds them), then times `buckets.dataset_image_sizes` (the
header reading of a run, without its cache) for each `--threads`, and the full decoding of `--decode_images` of them
(`images.open_image`, what the loader workers do per sample). The files are in the page cache after they are written:
the numbers are for a warm cache; a cold disk or a network file system is slower and gains more from threads.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import PIL.Image

from diffusers_pixnerd.training import load_training_dataset
from diffusers_pixnerd.training.buckets import dataset_image_sizes
from diffusers_pixnerd.training.images import open_image


def write_images(folder: str, num_images: int):
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    for i in range(num_images):
        path = os.path.join(folder, "images", f"{i}.jpg")
        if os.path.exists(path):
            continue
        height, width = rng.integers(200, 800, size=2)
        y, x = np.mgrid[0:height, 0:width]
        pixels = np.stack([x * 255 // width, y * 255 // height, np.full((height, width), i % 255)], -1)
        PIL.Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--decode_images", type=int, default=200)
    parser.add_argument("--folder", type=str, default=None)
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="image_sizes_")
    write_images(folder, args.num_images)
    dataset, _ = load_training_dataset(folder, label_column="label")
    for threads in args.threads:
        start = time.perf_counter()
        sizes = dataset_image_sizes(dataset, cache_dir=None, num_threads=threads)
        seconds = time.perf_counter() - start
        each = 1e3 * seconds / len(sizes)
        print(f"headers, {threads} threads: {len(sizes)} images in {seconds:.2f} s ({each:.2f} ms each)")
    start = time.perf_counter()
    for row in dataset.select(range(min(args.decode_images, len(dataset)))):
        open_image(row["image"])
    seconds, count = time.perf_counter() - start, min(args.decode_images, len(dataset))
    print(f"full decoding: {count} images in {seconds:.2f} s ({1e3 * seconds / count:.2f} ms each)")


if __name__ == "__main__":
    main()
