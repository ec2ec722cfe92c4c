# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Training data for the PixNerd scripts: image folders or `datasets` datasets, lazy decoding (one image: `images`),
and the data loader of a run.

Images are decoded in the data loader workers, one at a time, so that an unreadable file is skipped (and counted)
instead of stopping a long run; `fail_on_corrupt_images=True` makes it fatal. Layouts and columns are checked when
the dataset is built, before any training starts.
"""

import argparse
import json
import logging
import math
import os

import numpy as np
import PIL.Image
import torch

from ..pipelines import imagenet_id2label
from .images import (
    IMAGE_PREPROCESSING,
    describe_image,
    image_to_tensor,
    mask_path,
    open_image,
    open_mask,
    pad_to_size,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_FILE_EXTENSION = ".txt"
METADATA_FILE = "metadata.jsonl"
# Consecutive unreadable samples tolerated before the data is declared broken.
MAX_CONSECUTIVE_CORRUPT = 100


# --------------------------------------------------------------------------------------------------- folder layouts


def _image_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found.extend(os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS))
    return found


def scan_class_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """Images of a folder with one subfolder per class (the ImageNet / `torchvision.ImageFolder` layout).

    Returns the image paths, their class ids (subfolders in sorted order) and the class names (subfolder names).
    """
    if not os.path.isdir(root):
        raise ValueError(f"`--train_data_dir` {root!r} is not a folder.")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    loose = [f for f in os.listdir(root) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        raise ValueError(
            f"`--train_data_dir` {root!r} holds images directly ({loose[0]!r}, ...); class-conditional training "
            "expects one subfolder per class (root/<class name>/<image>), as for ImageNet."
        )
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(os.path.join(root, name))
        paths.extend(files)
        labels.extend([label] * len(files))
    if not paths:
        raise ValueError(
            f"`--train_data_dir` {root!r} has no images in class subfolders (root/<class name>/<image>, extensions "
            f"{', '.join(IMAGE_EXTENSIONS)})."
        )
    empty = [name for label, name in enumerate(classes) if label not in set(labels)]
    if empty:
        logger.warning("Class folders without images (their ids stay reserved): %s", empty)
    return paths, labels, classes


def scan_caption_folder(root: str, caption_column: str = "text") -> tuple[list[str], list[str]]:
    """Images and captions of a folder: `metadata.jsonl` (`file_name` + `caption_column`, the `datasets` imagefolder
    layout) if present, else a `.txt` file beside each image (the official layout, `image_txt.py`).

    Images without a caption are left out (with a warning); no caption at all is an error. In `metadata.jsonl` a
    `null` caption (or "") is the empty prompt, i.e. trains the unconditional model; a line that is not JSON, or a
    caption that is not a string, is an error naming the line.
    """
    if not os.path.isdir(root):
        raise ValueError(f"`--train_data_dir` {root!r} is not a folder.")
    metadata_path = os.path.join(root, METADATA_FILE)
    paths, captions = [], []
    if os.path.exists(metadata_path):
        with open(metadata_path, encoding="utf-8") as f:
            lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
        rows = []
        for number, line in lines:
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{metadata_path} line {number} is not valid JSON ({error.msg}).") from None
        uncaptioned_rows = 0
        for number, row in rows:
            if not isinstance(row, dict) or "file_name" not in row or caption_column not in row:
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"{metadata_path} line {number} has the keys {keys}; each line needs `file_name` and the "
                    f"caption column `--caption_column` ({caption_column!r})."
                )
            caption = row[caption_column]
            if caption is None:  # documented: a null caption is the empty prompt (an unconditional sample)
                caption, uncaptioned_rows = "", uncaptioned_rows + 1
            if not isinstance(caption, str):
                raise ValueError(
                    f"{metadata_path} line {number}: the caption ({caption_column!r}) must be a string or null, got "
                    f"{caption!r}."
                )
            row[caption_column] = caption
            paths.append(os.path.join(root, row["file_name"]))
            captions.append(row[caption_column])
        if uncaptioned_rows:
            logger.warning(
                "%d images in %s have a null caption: they train as the empty prompt.", uncaptioned_rows, root
            )
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            logger.warning(
                "%d files named in %s do not exist (they will count as unreadable), e.g. %s",
                len(missing),
                metadata_path,
                missing[0],
            )
        uncaptioned = len(set(_image_files(root)) - set(paths))
    else:
        uncaptioned = 0
        for path in _image_files(root):
            caption_path = os.path.splitext(path)[0] + CAPTION_FILE_EXTENSION
            if os.path.exists(caption_path):
                with open(caption_path, encoding="utf-8") as f:
                    captions.append(f.read().strip())
                paths.append(path)
            else:
                uncaptioned += 1
    if not paths:
        raise ValueError(
            f"`--train_data_dir` {root!r} has no captioned images. Text-to-image training expects either a "
            f"{METADATA_FILE} (one JSON object per line with `file_name` and {caption_column!r}) or a caption file "
            "beside each image (cat.jpg + cat.txt)."
        )
    if uncaptioned:
        logger.warning("%d images in %s have no caption and are left out.", uncaptioned, root)
    return paths, captions


# --------------------------------------------------------------------------------------------------------- datasets


def load_training_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    label_column: str | None = None,
    caption_column: str | None = None,
    streaming: bool = False,
    cache_dir: str | None = None,
):
    """A `datasets` dataset with the columns `image` (undecoded) and `label` (class ids) or `caption`.

    Exactly one of `train_data_dir` (a local folder: class subfolders when `label_column` is set, captions otherwise)
    and `dataset_name` (anything `datasets.load_dataset` takes: a Hub dataset, a local data folder) is given.
    Returns `(dataset, class_names)`; class names come from the subfolders or a `ClassLabel` column, else `None`.
    """
    import datasets

    if (train_data_dir is None) == (dataset_name is None):
        raise ValueError("Pass exactly one of `--train_data_dir` and `--dataset_name`.")
    if (label_column is None) == (caption_column is None):
        raise ValueError("Pass exactly one of `label_column` and `caption_column`.")
    target = "label" if label_column is not None else "caption"
    class_names = None

    if train_data_dir is not None:
        image = datasets.Image(decode=False)
        if target == "label":
            paths, labels, class_names = scan_class_folder(train_data_dir)
            features = datasets.Features({"image": image, "label": datasets.ClassLabel(names=class_names)})
            data = {"image": paths, "label": labels}
        else:
            paths, captions = scan_caption_folder(train_data_dir, caption_column)
            features = datasets.Features({"image": image, "caption": datasets.Value("string")})
            data = {"image": paths, "caption": captions}
        dataset = datasets.Dataset.from_dict(data, features=features)
        # Shards let the data loader workers (and processes) split a streamed folder.
        return (dataset.to_iterable_dataset(num_shards=min(64, len(paths))) if streaming else dataset), class_names

    dataset = datasets.load_dataset(
        dataset_name, dataset_config_name, split=split, streaming=streaming, cache_dir=cache_dir
    )
    features = dataset.features
    columns = list(features) if features is not None else None
    if columns is None:  # some streaming datasets only know their columns once read
        columns = list(next(iter(dataset)).keys())
    wanted = {"--image_column": image_column, f"--{target}_column": label_column or caption_column}
    for flag, column in wanted.items():
        if column not in columns:
            raise ValueError(f"`{flag}` {column!r} is not a column of {dataset_name!r}; its columns are {columns}.")
    source = label_column or caption_column
    dataset = dataset.select_columns([image_column, source])
    if image_column != "image":
        dataset = dataset.rename_column(image_column, "image")
    if source != target:
        dataset = dataset.rename_column(source, target)
    if features is not None and isinstance(features.get(image_column), datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image(decode=False))  # decoded in the workers, errors caught
    if target == "label" and features is not None:
        label_feature = features[source]
        if isinstance(label_feature, datasets.ClassLabel):
            class_names = list(label_feature.names)
        elif not (isinstance(label_feature, datasets.Value) and "int" in label_feature.dtype):
            raise ValueError(f"`--label_column` {source!r} must hold integer class ids, got {label_feature}.")
    return dataset, class_names


def count_classes(dataset, class_names: list[str] | None) -> int | None:
    """The number of classes: the names if known, else the largest label + 1 (map-style datasets only). Labels
    beyond the names are an error (they would silently train as the null class or crash)."""
    if class_names is not None:
        if hasattr(dataset, "__len__") and len(dataset) and int(max(dataset["label"])) >= len(class_names):
            raise ValueError(
                f"The data has labels up to {int(max(dataset['label']))} but there are {len(class_names)} class names "
                "(`--class_names`): give one name per class."
            )
        return len(class_names)
    if hasattr(dataset, "__len__"):
        return int(max(dataset["label"])) + 1
    return None


class ImageSampleDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses one row of a `datasets.Dataset` per item; an unreadable image is replaced by the next
    readable row (so batches keep their size on every rank) and counted in the item's `num_skipped`."""

    def __init__(
        self,
        dataset,
        resolution: int,
        preprocessing: str = "adm_center_crop",
        fail_on_corrupt_images: bool = False,
        masks: str | None = None,
        image_root: str | None = None,
    ):
        if preprocessing not in IMAGE_PREPROCESSING:
            raise ValueError(f"`preprocessing` {preprocessing!r} is not one of {sorted(IMAGE_PREPROCESSING)}.")
        self.dataset = dataset
        self.resolution = resolution
        self.preprocess = IMAGE_PREPROCESSING[preprocessing]
        self.fail_on_corrupt_images = fail_on_corrupt_images
        self.masks, self.image_root = masks, image_root  # loss masks: "alpha", a mask folder, or none

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, row: dict, size=None) -> dict | None:
        """The training sample of a row (at `size`, default `resolution`), or `None` if its image cannot be read."""
        mask = None
        try:
            image = open_image(row["image"])
            larger = max(image.size) > self.resolution
            source = row["mask"] if "mask" in row else self.masks  # a dataset config names each row's ("": none)
            if "mask" not in row and source not in (None, "alpha"):  # a mask folder: this image's file in it
                source = mask_path(row["image"], source, self.image_root)
            if source:  # a missing mask is a `MaskError`, never a skipped image
                mask = open_mask(row["image"], source, image.size)
            image = self.preprocess(image, self.resolution if size is None else size)
        except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as error:
            if self.fail_on_corrupt_images:
                raise RuntimeError(
                    f"Unreadable image {describe_image(row['image'])}: {error} (without `--fail_on_corrupt_images` it "
                    "would be skipped and counted)."
                ) from error
            logger.warning("Skipping unreadable image %s: %s", describe_image(row["image"]), error)
            return None
        sample = {k: v for k, v in row.items() if k not in ("image", "mask")}
        sample["pixel_values"] = image_to_tensor(image)
        if mask is not None:  # the same crop, resize or padding as the image (padding is not learned)
            mask = self.preprocess(mask.convert("RGB"), self.resolution if size is None else size).getchannel(0)
            sample["loss_mask"] = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None]
        if self.preprocess is pad_to_size:  # counted in the workers, where the size is known for free
            sample["num_downscaled"] = int(larger)
        return sample

    def sample_size(self, index: int):
        """The size row `index` is preprocessed to (an unreadable row's replacement gets the same)."""
        return self.resolution

    def __getitem__(self, index: int) -> dict:
        for skipped in range(MAX_CONSECUTIVE_CORRUPT):
            sample = self.load(self.dataset[(index + skipped) % len(self.dataset)], self.sample_size(index))
            if sample is not None:
                sample["num_skipped"] = skipped
                return sample
        raise RuntimeError(
            f"{MAX_CONSECUTIVE_CORRUPT} consecutive unreadable images from row {index}: check the data."
        )


class StreamingImageSampleDataset(torch.utils.data.IterableDataset):
    """The streaming counterpart of `ImageSampleDataset`: reads a `datasets.IterableDataset` (already split between
    processes) and drops unreadable images, counting them in the next sample's `num_skipped`."""

    def __init__(
        self, dataset, resolution: int, preprocessing="adm_center_crop", fail_on_corrupt_images=False, **masks
    ):
        self.dataset = dataset
        self.decoder = ImageSampleDataset([], resolution, preprocessing, fail_on_corrupt_images, **masks)

    def set_epoch(self, epoch: int):
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        skipped = 0
        for row in self.dataset:
            sample = self.decoder.load(row)
            if sample is None:
                skipped += 1
                continue
            sample["num_skipped"], skipped = skipped, 0
            yield sample


SUMMED_COUNTS = ("num_skipped", "num_downscaled")  # per-sample counts that a batch carries as their sum


def collate_samples(samples: list[dict]) -> dict:
    """Stacks tensors, keeps strings as lists, turns numbers into tensors and sums `SUMMED_COUNTS`."""
    batch = {k: sum(s.pop(k) for s in samples) for k in SUMMED_COUNTS if k in samples[0]}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], str):
            batch[key] = values
        else:
            batch[key] = torch.stack([torch.as_tensor(np.asarray(v)) for v in values])
    return batch


def read_class_names(spec: str | None, default: list[str] | None) -> list[str] | None:
    """Class names from `--class_names`: "imagenet" (the 1000 ImageNet names), a JSON file (`{"0": "name", ...}` or a
    list), a text file (one name a line) or a comma-separated list; `None` keeps `default` (the folder names)."""
    if spec is None:
        return default
    if spec == "imagenet":
        id2label = imagenet_id2label()
        return [id2label[str(i)] for i in range(len(id2label))]
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            if spec.endswith(".json"):
                names = json.load(f)
                return [names[str(i)] for i in range(len(names))] if isinstance(names, dict) else list(names)
            return [line.strip() for line in f if line.strip()]
    return [name.strip() for name in spec.split(",")]


# -------------------------------------------------------------------------------------------------- the data loader


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def dataloader_workers(requested: int, num_processes: int = 1) -> int:
    """`--dataloader_num_workers`, capped by the CPUs this process may use shared by the processes of the run (more
    workers than cores only slow the training step down)."""
    if requested < 0:
        raise ValueError(f"`--dataloader_num_workers` must be >= 0, got {requested}.")
    cap = max(1, available_cpus() // num_processes)
    if requested > cap:
        logger.info(
            "Data loader workers: %d instead of %d (%d CPUs for %d processes).",
            cap,
            requested,
            available_cpus(),
            num_processes,
        )
    return min(requested, cap)


def split_stream(accelerator, args: argparse.Namespace, dataset):
    """A streamed dataset shuffled with a `--shuffle_buffer_size` buffer and split between the processes."""
    from datasets.distributed import split_dataset_by_node

    dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
    return split_dataset_by_node(dataset, accelerator.process_index, accelerator.num_processes)


def mask_options(args: argparse.Namespace) -> dict:
    """The loss-mask settings of the training data (`--alpha_mask`, `--mask_data_dir`) for `ImageSampleDataset`."""
    if getattr(args, "alpha_mask", False):
        return {"masks": "alpha"}
    if getattr(args, "mask_data_dir", None):
        return {"masks": args.mask_data_dir, "image_root": args.train_data_dir}
    return {}


def check_masks(args: argparse.Namespace, dataset) -> None:
    """With `--mask_data_dir` or a dataset config's `mask_dir`, every image of a map-style dataset has its mask file:
    checked before training, all at once, so that a missing one is not found hours in."""
    if "mask" in (dataset.column_names or []):  # a dataset config's folders
        paths = [path for path in dataset["mask"] if path and path != "alpha"]
        where = "The dataset config's `mask_dir` folders lack"
    elif getattr(args, "mask_data_dir", None):
        paths = [mask_path(value, args.mask_data_dir, args.train_data_dir) for value in dataset["image"]]
        where = f"`--mask_data_dir` {args.mask_data_dir!r} lacks"
    else:
        return
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ValueError(
            f"{where} the masks of {len(missing)} of {len(paths)} images, e.g. {missing[0]} (a PNG of each image's "
            "path relative to its folder, white = learn)."
        )


def create_dataloader(accelerator, args: argparse.Namespace, dataset):
    """A shuffled data loader of decoded samples; map-style data is sharded and seeded by Accelerate (so resuming can
    skip to the exact batch), streamed data is split between processes here. With `--aspect_ratio_buckets` the
    scripts build `buckets.create_bucket_dataloader` instead."""
    num_workers = dataloader_workers(args.dataloader_num_workers, accelerator.num_processes)
    if args.streaming:
        dataset = split_stream(accelerator, args, dataset)
        samples = StreamingImageSampleDataset(
            dataset, args.resolution, args.image_preprocessing, args.fail_on_corrupt_images, **mask_options(args)
        )
        return torch.utils.data.DataLoader(
            samples,
            batch_size=args.train_batch_size,
            num_workers=num_workers,  # not persistent: each epoch's stream position is set in the main process
            collate_fn=collate_samples,
            drop_last=True,
        )
    check_masks(args, dataset)
    samples = ImageSampleDataset(
        dataset, args.resolution, args.image_preprocessing, args.fail_on_corrupt_images, **mask_options(args)
    )
    loader = torch.utils.data.DataLoader(
        samples,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # no new worker processes (and image decoders) every epoch
        collate_fn=collate_samples,
        drop_last=True,
    )
    loader = accelerator.prepare(loader)
    if len(loader) == 0:
        raise ValueError(
            f"The dataset has {len(samples)} images, fewer than one batch (`--train_batch_size` "
            f"{args.train_batch_size}) for each of the {accelerator.num_processes} processes."
        )
    return loader


def training_steps(args: argparse.Namespace, dataloader) -> tuple[int, int | None]:
    """`(max_train_steps, optimizer steps per epoch)`; the second is `None` for a streamed dataset."""
    if args.streaming:
        return args.max_train_steps, None
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch, steps_per_epoch
