# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Aspect-ratio buckets (`--aspect_ratio_buckets`): images keep their aspect ratio and train at one of a few sizes of
about `resolution**2` pixels, every batch from one size.

PixNerd runs at any height and width that are multiples of `transformer.resolution_multiple` (the patch size for the
class-conditional model, `lcm(patch_size, sample_size / patch_size)` for the text model, whose backbone keeps its
token grid and renders larger or smaller patches). The bucket table, the assignment of images to buckets, the image
sizes read from the file headers (cached), the resize-and-crop to a bucket, the seeded batch order and the data
loader built from them (`create_bucket_dataloader`, which `data.create_dataloader` returns with the flag) live here.
"""

import argparse
import functools
import hashlib
import io
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

import numpy as np
import PIL.Image
import torch

from .data import (
    ImageSampleDataset,
    StreamingImageSampleDataset,
    available_cpus,
    check_masks,
    collate_samples,
    dataloader_workers,
    mask_options,
    split_stream,
)

logger = logging.getLogger(__name__)

# The most elongated bucket: long side / short side at most this (1:2 to 2:1). Beyond it the text model's fixed token
# grid would render patches more than twice as wide as high, and few photos are more elongated.
MAX_ASPECT_RATIO = 2.0
SIZE_CACHE_PREFIX = "image_sizes_"
SIZE_CACHE_VERSION = 1


def aspect_ratio_buckets(
    resolution: int, multiple: int, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> list[tuple[int, int]]:
    """The bucket sizes `(height, width)` for `--resolution`, from the widest to the tallest.

    Each short side `s` is a multiple of `multiple` up to `resolution`; its long side is the largest multiple of
    `multiple` with `s * long <= resolution**2` (no bucket holds more pixels than the square one, so no batch needs
    more memory). A pair is kept when `long / s <= max_aspect_ratio`, in both orientations.
    """
    if resolution < multiple or multiple < 1:
        raise ValueError(f"`--resolution` ({resolution}) must be at least the model's size multiple ({multiple}).")
    area = resolution * resolution
    sizes = set()
    for short in range(multiple, resolution + 1, multiple):
        long = area // short // multiple * multiple
        if long >= short and long <= max_aspect_ratio * short:
            sizes.update({(short, long), (long, short)})
    return sorted(sizes, key=lambda size: size[0] / size[1])


def assign_buckets(sizes: np.ndarray, buckets: Sequence[tuple[int, int]]) -> np.ndarray:
    """The bucket of each image `(height, width)` (an `(N, 2)` array): the nearest aspect ratio on a log scale (ties go
    to the first bucket in the table). Unknown sizes (`-1`, an unreadable header) go to the most square bucket."""
    sizes = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    log_ratios = np.log(np.array([h / w for h, w in buckets]))
    known = (sizes > 0).all(axis=1)
    image_log_ratios = np.zeros(len(sizes))
    image_log_ratios[known] = np.log(sizes[known, 0] / sizes[known, 1])
    return np.abs(image_log_ratios[:, None] - log_ratios[None]).argmin(axis=1)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket size for one image of `height` x `width`."""
    return tuple(buckets[int(assign_buckets([[height, width]], buckets)[0])])


def cover_crop(image: PIL.Image.Image, size: tuple[int, int], resample: int = PIL.Image.BICUBIC) -> PIL.Image.Image:
    """Resizes `image` to cover `size` (height, width), keeping its aspect ratio, and takes the centre: one resampling
    of the centred region of the target's aspect ratio (PIL's `box`), antialiased when shrinking."""
    height, width = size
    if image.size == (width, height):
        return image
    source_width, source_height = image.size
    if source_width * height > source_height * width:  # wider than the target: crop the sides
        crop_width = source_height * width / height
        box = ((source_width - crop_width) / 2, 0.0, (source_width + crop_width) / 2, float(source_height))
    else:  # taller: crop top and bottom
        crop_height = source_width * height / width
        box = (0.0, (source_height - crop_height) / 2, float(source_width), (source_height + crop_height) / 2)
    return image.resize((width, height), resample=resample, box=box)


# ----------------------------------------------------------------------------------------- image sizes, up front


def image_size(value) -> tuple[int, int]:
    """`(height, width)` of an image column value (a path, `{"bytes", "path"}`, a PIL image) from its header only
    (PIL opens lazily: the pixels are not decoded); `(-1, -1)` if it cannot be read (it is skipped when loaded)."""
    try:
        if isinstance(value, PIL.Image.Image):
            return value.height, value.width
        if isinstance(value, dict):
            value = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
        with PIL.Image.open(value) as image:
            width, height = image.size
        return height, width
    except (OSError, ValueError, SyntaxError, TypeError, PIL.Image.DecompressionBombError):
        return -1, -1


def read_image_sizes(images: Iterable[list], num_threads: int = 8) -> np.ndarray:
    """`(N, 2)` int64 sizes of image column values given in chunks (file reads overlap in `num_threads` threads)."""
    sizes = []
    with ThreadPoolExecutor(num_threads) as pool:
        for chunk in images:
            sizes.extend(pool.map(image_size, chunk))
    return np.array(sizes, dtype=np.int64).reshape(-1, 2)


def image_column_key(dataset) -> str:
    """A key of a `datasets.Dataset`'s image column for the size cache: the file paths and the lengths of embedded
    image bytes, read from Arrow (the offsets, not the images). Unlike the dataset's fingerprint it is the same on every
    process and in every run, also after `--precompute_text_embeddings` adds a column. An image replaced under the
    same name and length keeps its cached size (which only affects its bucket). With an indices mapping (a shuffled or
    selected dataset): the fingerprint."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if getattr(dataset, "_indices", None) is not None:
        return dataset._fingerprint
    digest = hashlib.sha256(str(len(dataset)).encode())
    for chunk in dataset.data.table.column("image").chunks:
        if pa.types.is_struct(chunk.type):
            fields = dict(zip([field.name for field in chunk.type], chunk.flatten()))
            digest.update(json.dumps(fields["path"].to_pylist()).encode())
            digest.update(pc.fill_null(pc.binary_length(fields["bytes"]), 0).to_numpy().tobytes())
        else:  # paths as strings
            digest.update(json.dumps(chunk.to_pylist()).encode())
    return digest.hexdigest()[:16]


def dataset_image_sizes(dataset, cache_dir: str | None = None, num_threads: int = 8) -> np.ndarray:
    """The `(height, width)` of every row of a `datasets.Dataset` (column `image`), read from the headers once and
    cached in `cache_dir` as `image_sizes_<key>.json` (written atomically; `image_column_key`). Logs how long the
    reading took."""
    cache_file = None
    if cache_dir is not None:
        cache_file = os.path.join(cache_dir, f"{SIZE_CACHE_PREFIX}{image_column_key(dataset)}.json")
        cached = _read_size_cache(cache_file, len(dataset))
        if cached is not None:
            logger.info("Image sizes of %d images from %s", len(cached), cache_file)
            return cached
    start = time.perf_counter()
    images = dataset.select_columns(["image"]).with_format(None)
    sizes = read_image_sizes((batch["image"] for batch in images.iter(batch_size=1024)), num_threads)
    unreadable = int((sizes < 0).any(axis=1).sum())
    logger.info(
        "Read the sizes of %d images from their headers in %.2f s (%d threads)%s",
        len(sizes),
        time.perf_counter() - start,
        num_threads,
        f"; {unreadable} unreadable (skipped when loaded)" if unreadable else "",
    )
    if cache_file is not None:
        _write_size_cache(cache_file, sizes)
    return sizes


def _read_size_cache(path: str, num_rows: int) -> np.ndarray | None:
    try:
        with open(path, encoding="utf-8") as f:
            cached = json.load(f)
        sizes = np.array(cached["sizes"], dtype=np.int64).reshape(-1, 2)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if cached.get("version") != SIZE_CACHE_VERSION or len(sizes) != num_rows:
        return None
    return sizes


def _write_size_cache(path: str, sizes: np.ndarray):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"version": SIZE_CACHE_VERSION, "sizes": sizes.tolist()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------------- batch order


class AspectRatioBucketSampler(torch.utils.data.Sampler):
    r"""
    Batches of indices of one bucket each, in an order that is a pure function of (`seed`, epoch, the buckets of the
    rows, the batch layout): the same on every process, and the same when a run resumes.

    Each epoch, every bucket's rows are shuffled and cut into groups of `batch_size * num_processes` (a bucket's
    incomplete rest is left out of the epoch; the next epoch's shuffle leaves out other rows), the groups are shuffled,
    and each group is yielded as `num_processes` consecutive batches of `batch_size`. Accelerate's `BatchSamplerShard`
    gives batch `i` to process `i % num_processes`, so at every step all processes train on the same bucket, each on
    its own rows; `skip_first_batches` skips whole steps. Accelerate's `set_epoch` does not reach this sampler through
    those wrappers (`BatchSamplerShard`, `SkipBatchSampler`), so the caller sets it (`TrainingRun.batches`).

    Parameters:
        bucket_ids (`Sequence[int]`): the bucket of each row.
        batch_size (`int`): the batch of one process.
        num_processes (`int`, defaults to 1): the processes the batches are shared between.
        seed (`int`, defaults to 0): the seed of the order.
    """

    drop_last = True  # read by Accelerate's BatchSamplerShard: every batch is full

    def __init__(self, bucket_ids: Sequence[int], batch_size: int, num_processes: int = 1, seed: int = 0):
        self.bucket_ids = np.asarray(bucket_ids, dtype=np.int64)
        self.batch_size, self.num_processes, self.seed, self.epoch = batch_size, num_processes, seed, 0
        num_buckets = int(self.bucket_ids.max()) + 1 if len(self.bucket_ids) else 0
        self.members = [np.flatnonzero(self.bucket_ids == b) for b in range(num_buckets)]

    @property
    def group_size(self) -> int:
        return self.batch_size * self.num_processes

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def groups(self, epoch: int) -> list[np.ndarray]:
        """The epoch's groups in order: `batch_size * num_processes` row indices of one bucket each (one batch of every
        process)."""
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        groups = []
        for rows in self.members:
            rows = rows[rng.permutation(len(rows))]
            steps = len(rows) // self.group_size
            groups.extend(rows[: steps * self.group_size].reshape(steps, self.group_size))
        return [groups[i] for i in rng.permutation(len(groups))]

    def __iter__(self) -> Iterator[list[int]]:
        for group in self.groups(self.epoch):
            yield from group.reshape(self.num_processes, self.batch_size).tolist()

    def __len__(self) -> int:
        return sum(len(rows) // self.group_size for rows in self.members) * self.num_processes

    def dropped_per_epoch(self) -> int:
        return sum(len(rows) % self.group_size for rows in self.members)


def describe_buckets(buckets: Sequence[tuple[int, int]], bucket_ids: np.ndarray, group_size: int) -> str:
    """The bucket table with the number of images in each and the batches (of all processes) they make, for the log."""
    counts = np.bincount(bucket_ids, minlength=len(buckets))
    return ", ".join(
        f"{h}x{w} ({h / w:.2f}): {n} images, {n // group_size} batches" for (h, w), n in zip(buckets, counts)
    )


class BucketBatchStream(torch.utils.data.IterableDataset):
    """Streamed samples of several sizes grouped into batches of one size: a buffer per bucket, a batch yielded as
    soon as a buffer holds `batch_size` samples (what is left in the buffers at the end of the stream is dropped).
    `collate` makes the batch."""

    def __init__(self, samples: torch.utils.data.IterableDataset, batch_size: int, collate):
        self.samples, self.batch_size, self.collate = samples, batch_size, collate

    def set_epoch(self, epoch: int):
        self.samples.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        buffers: dict[tuple, list] = {}
        for sample in self.samples:
            buffer = buffers.setdefault(tuple(sample["pixel_values"].shape), [])
            buffer.append(sample)
            if len(buffer) == self.batch_size:
                yield self.collate(buffer)
                buffer.clear()


# ------------------------------------------------------------------------------------------------- the data loader

# The resampling filter of `--image_preprocessing` when images are resized to their bucket (`pad` does not crop).
BUCKET_RESAMPLING = {"adm_center_crop": PIL.Image.BICUBIC, "resize_center_crop": PIL.Image.BILINEAR}


class BucketImageSampleDataset(ImageSampleDataset):
    """`ImageSampleDataset` with aspect-ratio buckets: row `i` is resized to cover `sizes[i]` (its bucket's height and
    width) and centre-cropped; an unreadable row's replacement is made the same size, so the batch stays one bucket."""

    def __init__(
        self, dataset, sizes: np.ndarray, preprocessing="adm_center_crop", fail_on_corrupt_images=False, **masks
    ):
        if preprocessing not in BUCKET_RESAMPLING:
            raise ValueError(f"`preprocessing` {preprocessing!r} must be one of {list(BUCKET_RESAMPLING)} (buckets).")
        super().__init__(dataset, 0, preprocessing, fail_on_corrupt_images, **masks)
        self.sizes = np.asarray(sizes)
        self.preprocess = functools.partial(cover_crop, resample=BUCKET_RESAMPLING[preprocessing])

    def sample_size(self, index: int) -> tuple[int, int]:
        height, width = self.sizes[index]
        return int(height), int(width)


def crop_to_nearest_bucket(image: PIL.Image.Image, resolution, buckets, resample) -> PIL.Image.Image:
    """A streamed image resized to cover the bucket nearest its aspect ratio and centre-cropped (`resolution` unused:
    the bucket sets the size)."""
    return cover_crop(image, nearest_bucket(image.height, image.width, buckets), resample)


def create_bucket_dataloader(accelerator, args: argparse.Namespace, dataset, resolution_multiple: int | None):
    r"""
    The data loader of `--aspect_ratio_buckets`: every batch holds images of one bucket
    (`buckets.aspect_ratio_buckets`: about `--resolution`**2 pixels, sides multiples of `resolution_multiple`), each
    resized to cover its bucket and centre-cropped.

    Map-style data: the image sizes are read from the headers up front by the main process (once: cached under
    `--cache_dir`, default `<output_dir>/cache/`) and sent to the others; every image goes to the bucket nearest its
    aspect ratio, and `AspectRatioBucketSampler` orders the batches from (seed, epoch, the data) alone; Accelerate
    shares them between processes (all processes on one bucket per step) and skips them on resume. Streamed data: a
    buffer per bucket on each process (each process's bucket at a step then depends on its stream, and a resume
    re-reads the stream as without buckets).
    """
    if resolution_multiple is None:
        raise ValueError("`--aspect_ratio_buckets` needs the model's `resolution_multiple` (the size granularity).")
    if args.image_preprocessing not in BUCKET_RESAMPLING:
        raise ValueError(
            f"`--aspect_ratio_buckets` resizes and crops; it cannot be used with `--image_preprocessing "
            f"{args.image_preprocessing}` (choose one of {', '.join(BUCKET_RESAMPLING)})."
        )
    buckets = aspect_ratio_buckets(args.resolution, resolution_multiple)
    resample = BUCKET_RESAMPLING[args.image_preprocessing]
    num_workers = dataloader_workers(args.dataloader_num_workers, accelerator.num_processes)
    logger.info(
        "Aspect-ratio buckets for `--resolution` %d (sides multiples of %d): %s",
        args.resolution,
        resolution_multiple,
        ", ".join(f"{h}x{w}" for h, w in buckets),
    )
    if args.streaming:
        samples = StreamingImageSampleDataset(
            split_stream(accelerator, args, dataset),
            args.resolution,
            "adm_center_crop",
            args.fail_on_corrupt_images,
            **mask_options(args),
        )
        samples.decoder.preprocess = functools.partial(crop_to_nearest_bucket, buckets=buckets, resample=resample)
        batches = BucketBatchStream(samples, args.train_batch_size, collate_samples)
        return torch.utils.data.DataLoader(batches, batch_size=None, num_workers=num_workers)

    from accelerate.utils import broadcast_object_list

    sizes = None  # read (or taken from the cache) by the main process and sent to the others
    if accelerator.is_main_process:
        cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
        sizes = dataset_image_sizes(dataset, cache_dir, num_threads=min(32, 4 * available_cpus()))
    sizes = broadcast_object_list([sizes])[0]
    bucket_ids = assign_buckets(sizes, buckets)
    sampler = AspectRatioBucketSampler(bucket_ids, args.train_batch_size, accelerator.num_processes, args.seed)
    if accelerator.is_main_process:
        logger.info(
            "Images per bucket (height x width): %s; each epoch leaves out %d images (incomplete batches; the "
            "shuffle changes which)",
            describe_buckets(buckets, bucket_ids, sampler.group_size),
            sampler.dropped_per_epoch(),
        )
    check_masks(args, dataset)
    samples = BucketImageSampleDataset(
        dataset,
        np.array(buckets)[bucket_ids],
        args.image_preprocessing,
        args.fail_on_corrupt_images,
        **mask_options(args),
    )
    loader = torch.utils.data.DataLoader(
        samples,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        collate_fn=collate_samples,
    )
    loader = accelerator.prepare(loader)
    if len(loader) == 0:
        raise ValueError(
            f"No aspect-ratio bucket holds a full batch: each needs {sampler.group_size} images (`--train_batch_size` "
            f"{args.train_batch_size} x {accelerator.num_processes} processes); the largest holds "
            f"{max(len(rows) for rows in sampler.members)}. Use a smaller batch or train without "
            "`--aspect_ratio_buckets`."
        )
    return loader


def set_loader_epoch(loader, epoch: int) -> None:
    """`loader.set_epoch(epoch)`, and the epoch of an `AspectRatioBucketSampler` inside it: Accelerate's `set_epoch`
    reaches a batch sampler only when the loader holds it unwrapped (one process, no skip), not inside its
    `BatchSamplerShard` (several processes) or `SkipBatchSampler` (a resumed epoch)."""
    loader.set_epoch(epoch)
    sampler = getattr(loader, "batch_sampler", None)
    while sampler is not None and not isinstance(sampler, AspectRatioBucketSampler):
        sampler = getattr(sampler, "batch_sampler", None)
    if sampler is not None:
        sampler.set_epoch(epoch)
