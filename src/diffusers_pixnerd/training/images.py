# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""One training image: decoding (any mode to 8-bit RGB, truncated files fail here) and the preprocessing of
`--image_preprocessing` (the official ADM and T2I crops, or padding), then the tensor the model takes."""

import io
import os
from typing import Any, Callable

import numpy as np
import PIL.Image
import torch


def adm_center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """The ADM centre crop of the official C2I data (`src/data/dataset/imagenet.py`, from guided-diffusion): halve with
    BOX filtering while the short side is at least `2 * size`, BICUBIC-resize the short side to `size`, crop the centre.
    """
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=PIL.Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=PIL.Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return PIL.Image.fromarray(arr[top : top + size, left : left + size])


def resize_center_crop(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """torchvision's `Resize(size)` + `CenterCrop(size)` on a PIL image (the official T2I data, `image_txt.py`):
    BILINEAR (antialiased by PIL) short side to `size`, long side truncated, then the rounded centre crop."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:
        image = image.resize(new_size, resample=PIL.Image.BILINEAR)
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def pad_to_size(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Pads (black, centred) to `size` x `size` without cropping, e.g. 28x28 Fashion-MNIST to 32x32; a larger image is
    first scaled down (BICUBIC, aspect ratio kept) to fit. The training loop logs how many were (`num_downscaled`)."""
    if max(image.size) > size:
        scale = size / max(image.size)
        image = image.resize(tuple(max(1, round(x * scale)) for x in image.size), resample=PIL.Image.BICUBIC)
    canvas = PIL.Image.new(image.mode, (size, size))
    canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return canvas


IMAGE_PREPROCESSING: dict[str, Callable[[PIL.Image.Image, int], PIL.Image.Image]] = {
    "adm_center_crop": adm_center_crop,
    "resize_center_crop": resize_center_crop,
    "pad": pad_to_size,
}


def image_to_tensor(image: PIL.Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def open_image(value: Any) -> PIL.Image.Image:
    """Decodes an image column value (a path, `{"bytes", "path"}` as `datasets.Image(decode=False)` stores it, or an
    already decoded PIL image) to RGB, reading the whole file so that a truncated one fails here."""
    if isinstance(value, PIL.Image.Image):
        image = value
    elif isinstance(value, dict):
        image = PIL.Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    else:
        image = PIL.Image.open(value)
    return to_rgb(image)


class MaskError(RuntimeError):
    """A training image without the loss mask the run asks for: an error, never a skipped image."""


def image_path(value: Any) -> str | None:
    """The file path of an image column value (a path, or `{"bytes", "path"}`), `None` for bytes or a PIL image."""
    if isinstance(value, dict):
        return value.get("path")
    return value if isinstance(value, (str, os.PathLike)) else None


def mask_path(value: Any, mask_data_dir: str, image_root: str) -> str:
    """The mask file of an image for `--mask_data_dir`: the image's path relative to `--train_data_dir`, as a PNG."""
    path = image_path(value)
    if path is None:
        raise MaskError("`--mask_data_dir` finds masks by file name: the images must be files of `--train_data_dir`.")
    relative = os.path.relpath(path, image_root)
    return os.path.join(mask_data_dir, os.path.splitext(relative)[0] + ".png")


def open_mask(value: Any, source: str, size: tuple[int, int]) -> PIL.Image.Image:
    """The loss mask of an image (mode "L", white = learn, the image's `size`): its alpha channel (`source="alpha"`)
    or the mask file `source`."""
    if source == "alpha":
        raw = value if isinstance(value, PIL.Image.Image) else open_raw(value)
        if "A" not in raw.getbands() and "transparency" not in raw.info:
            raise MaskError(
                f"{describe_image(value)} has no alpha channel for `--alpha_mask` (the loss mask: opaque = learn); "
                "save the images as RGBA PNGs, or give the masks as files with `--mask_data_dir`."
            )
        mask = raw.convert("RGBA").getchannel("A")
    else:
        if not os.path.isfile(source):
            raise MaskError(f"No mask for {describe_image(value)}: expected {source} (white = learn).")
        with PIL.Image.open(source) as opened:
            mask = opened.convert("L")
    if mask.size != size:
        raise MaskError(f"The mask of {describe_image(value)} is {mask.size}, the image {size} (width, height).")
    return mask


def open_raw(value: Any) -> PIL.Image.Image:
    """An image column value decoded as it is stored (any mode)."""
    if isinstance(value, dict):
        image = PIL.Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    else:
        image = PIL.Image.open(value)
    image.load()
    return image


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB: 16-bit and float grayscale scaled to 0..255 (PIL's own conversion clips them to white), palette and
    alpha images composited onto black (the transparent parts become the background, not their hidden colour)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        maximum = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(np.round(array / maximum * 255), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        scale = 255.0 if array.max() <= 1.0 else 1.0
        image = PIL.Image.fromarray(np.clip(np.round(array * scale), 0, 255).astype(np.uint8), "L")
    if image.mode == "P" or "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = PIL.Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def describe_image(value: Any) -> str:
    """A path (or a short description) of an image column value, for the log."""
    if isinstance(value, dict):
        return value.get("path") or f"<{len(value.get('bytes') or b'')} bytes>"
    return str(value) if isinstance(value, (str, os.PathLike)) else type(value).__name__
