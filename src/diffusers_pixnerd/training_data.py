# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Deprecated: moved to `diffusers_pixnerd.training.data`. This module re-exports the names it had and will be
removed in 0.2.0."""

import warnings

from .training.data import (
    CAPTION_FILE_EXTENSION,
    IMAGE_EXTENSIONS,
    IMAGE_PREPROCESSING,
    MAX_CONSECUTIVE_CORRUPT,
    METADATA_FILE,
    ImageSampleDataset,
    StreamingImageSampleDataset,
    add_prompt_embeddings,
    adm_center_crop,
    collate_samples,
    count_classes,
    describe_image,
    image_to_tensor,
    load_training_dataset,
    open_image,
    pad_to_size,
    read_class_names,
    resize_center_crop,
    scan_caption_folder,
    scan_class_folder,
    to_rgb,
)

warnings.warn(
    "diffusers_pixnerd.training_data moved to diffusers_pixnerd.training.data; the old path will be removed in 0.2.0",
    FutureWarning,
    stacklevel=2,
)

__all__ = [
    "CAPTION_FILE_EXTENSION",
    "IMAGE_EXTENSIONS",
    "IMAGE_PREPROCESSING",
    "ImageSampleDataset",
    "MAX_CONSECUTIVE_CORRUPT",
    "METADATA_FILE",
    "StreamingImageSampleDataset",
    "add_prompt_embeddings",
    "adm_center_crop",
    "collate_samples",
    "count_classes",
    "describe_image",
    "image_to_tensor",
    "load_training_dataset",
    "open_image",
    "pad_to_size",
    "read_class_names",
    "resize_center_crop",
    "scan_caption_folder",
    "scan_class_folder",
    "to_rgb",
]
