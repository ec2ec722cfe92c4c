# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""What the editing pipelines (image-to-image, inpainting, outpainting) add to sampling: reading `image` and
`mask_image`, placing the image on the canvas, cutting the schedule by `strength`, and the region kept from the input.

PixNerd samples pixels, so no VAE stands between the input and the output: the kept region follows the noised input
on the scheduler's grid while sampling, and at the end it is the input's pixels themselves."""

from typing import NamedTuple

import numpy as np
import PIL.Image
import torch

from ..utils import is_integer, is_real
from .pipeline_utils import KeepRegion, retrieve_timesteps


class EditInputs(NamedTuple):
    """An editing call's input on the canvas: one entry per image given (1, or one per prompt or class label)."""

    pixels: torch.Tensor  # (N, 3, H, W) in [-1, 1]; 0 where the canvas has no input (outpainting)
    mask: torch.Tensor | None  # (N, 1, H, W) in [0, 1], 1 = repaint; `None` for image-to-image
    height: int
    width: int
    strength: float  # checked: in (0, 1]

    def for_batch(self, num_conditions: int, num_images_per_prompt: int, device) -> "EditInputs":
        """One entry per image of the call: an input given once is shared, one per condition is repeated
        `num_images_per_prompt` times (the order of the conditions' batch)."""
        count = self.pixels.shape[0]
        if count not in (1, num_conditions):
            raise ValueError(
                f"`image` holds {count} images for {num_conditions} prompts (or class labels): pass one image for "
                "all, or one per prompt."
            )
        repeats = num_conditions * num_images_per_prompt if count == 1 else num_images_per_prompt
        pixels = self.pixels.repeat_interleave(repeats, dim=0).to(device)
        mask = None
        if self.mask is not None:
            mask = self.mask.expand(count, -1, -1, -1).repeat_interleave(repeats, dim=0).to(device)
        return self._replace(pixels=pixels, mask=mask)


def to_image_batch(value, name: str, channels: int) -> torch.Tensor:
    """`value` (a PIL image, a numpy array, a tensor, or a list of them of one size) as float32 (N, C, H, W) in [0, 1]
    with `channels` 3 (an image: PIL converted to RGB, one channel repeated) or 1 (a mask: PIL converted to "L").

    numpy arrays are (H, W), (H, W, C) or (N, H, W, C); tensors (H, W), (C, H, W) or (N, C, H, W). uint8 values are
    read as 0..255; float values must lie in [0, 1], or for an image tensor in [-1, 1] (a tensor with negative values
    is read as [-1, 1], as diffusers' `VaeImageProcessor` reads it)."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, (PIL.Image.Image, np.ndarray, torch.Tensor)) for v in items):
        wrong = next((v for v in items if not isinstance(v, (PIL.Image.Image, np.ndarray, torch.Tensor))), value)
        raise ValueError(
            f"`{name}` must be a PIL image, a numpy array, a torch.Tensor or a non-empty list of them, got "
            f"{type(wrong).__name__}."
        )
    tensors = [_to_tensor(v, name, channels) for v in items]
    sizes = {tuple(t.shape[-2:]) for t in tensors}
    if len(sizes) > 1:
        raise ValueError(f"The images of `{name}` must have one size (height, width), got {sorted(sizes)}.")
    return torch.cat(tensors)


def _to_tensor(value, name: str, channels: int) -> torch.Tensor:
    """One entry of `to_image_batch`."""
    if isinstance(value, PIL.Image.Image):
        value = np.asarray(value.convert("RGB" if channels == 3 else "L"))
    signed = False
    if isinstance(value, np.ndarray):
        if value.ndim == 2:
            value = value[..., None]
        if value.ndim == 3:
            value = value[None]
        if value.ndim != 4:
            raise ValueError(
                f"`{name}` as a numpy array must be (H, W), (H, W, C) or (N, H, W, C), got {value.shape}."
            )
        tensor = torch.from_numpy(np.array(value)).permute(0, 3, 1, 2)  # a copy: PIL arrays are read-only
    else:
        tensor = value.detach().cpu()
        if tensor.ndim == 2:
            tensor = tensor[None]
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(
                f"`{name}` as a tensor must be (H, W), (C, H, W) or (N, C, H, W), got {tuple(tensor.shape)}."
            )
        signed = channels == 3
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255
    elif tensor.is_floating_point():
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise ValueError(f"`{name}` contains NaN or infinite values.")
        low = -1.0 if signed and tensor.min() < 0 else 0.0
        if tensor.min() < low or tensor.max() > 1:
            ranges = "[0, 1] (or [-1, 1] for an image tensor)" if signed else "[0, 1]"
            raise ValueError(
                f"`{name}` values must lie in {ranges} for floats (uint8 in 0..255), got [{tensor.min().item():.4g}, "
                f"{tensor.max().item():.4g}]."
            )
        if low < 0:
            tensor = (tensor + 1) / 2
    else:
        raise ValueError(f"`{name}` must hold uint8 or float values, got {tensor.dtype}.")
    found = tensor.shape[1]
    if channels == 1 and found != 1:
        raise ValueError(
            f"`{name}` must have one channel (white = repaint, black = keep), got {found} channels of shape "
            f"{tuple(tensor.shape)}: pass one channel (`mask[..., 0]` of an (H, W, C) array, or a PIL image in "
            "mode 'L', e.g. `mask.convert('L')`)."
        )
    if channels == 3 and found not in (1, 3):
        raise ValueError(f"`{name}` must have 1 or 3 channels (RGB), got {found} (shape {tuple(tensor.shape)}).")
    return tensor.expand(-1, channels, -1, -1).contiguous()


def check_strength(strength) -> float:
    """`strength` as a float in (0, 1]."""
    if not is_real(strength) or not 0 < strength <= 1:
        raise ValueError(
            f"`strength` must be a number in (0, 1] (how much of the schedule runs: 1 = from pure noise), got "
            f"{strength!r}."
        )
    return float(strength)


def strength_start(num_inference_steps: int, strength: float) -> int:
    """The index of the first step of a schedule of `num_inference_steps` steps that `strength` runs, counted as
    diffusers' image-to-image pipelines count it (`int(N - N * strength)`, in floats): the call runs the last
    `num_inference_steps - start` steps, at least one for any `strength` that is not vanishingly small. No step at
    all is a `ValueError` naming both."""
    start = int(max(num_inference_steps - min(num_inference_steps * strength, num_inference_steps), 0))
    if start >= num_inference_steps:
        raise ValueError(
            f"`strength` {strength} runs no step of the {num_inference_steps} of `num_inference_steps` (it runs the "
            f"last N - int(N - N * strength) of them): raise `strength`, e.g. to {1 / num_inference_steps:.4g}."
        )
    return start


def check_offset(image_offset, image_size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """`image_offset` (top, left) of an image of `image_size` on a canvas of `canvas` (height, width); `None` centres
    it. The image must lie on the canvas."""
    (h, w), (height, width) = image_size, canvas
    if h > height or w > width:
        raise ValueError(
            f"`image` ({h}x{w}, height x width) is larger than the canvas `height` x `width` ({height}x{width}): "
            "crop or resize it first (the pipelines never resize, so that kept pixels stay exact)."
        )
    if image_offset is None:
        return (height - h) // 2, (width - w) // 2
    if (
        not isinstance(image_offset, (tuple, list))
        or len(image_offset) != 2
        or not all(is_integer(v) for v in image_offset)
    ):
        raise ValueError(f"`image_offset` must be a pair of integers (top, left), got {image_offset!r}.")
    top, left = int(image_offset[0]), int(image_offset[1])
    if not (0 <= top <= height - h and 0 <= left <= width - w):
        raise ValueError(
            f"`image_offset` {image_offset!r} puts the {h}x{w} image outside the {height}x{width} canvas: top must be "
            f"in [0, {height - h}] and left in [0, {width - w}]."
        )
    return top, left


def edit_inputs(image, mask_image, height, width, image_offset, strength, *, inpaint: bool) -> EditInputs:
    """The `image` (and `mask_image`) of an editing call on its canvas, and its checked `strength`. Image-to-image
    (`inpaint=False`) keeps the image's size. Inpainting puts the image on a canvas of `height` x `width` (default:
    the image's size) at `image_offset`; the mask (the image's size, white = repaint) says what of the image is
    repainted, and the canvas beyond the image is always painted (outpainting, which starts from noise: `strength` 1)."""
    strength = check_strength(strength)
    if image is None:
        raise ValueError("`image` is required: the picture to edit (PIL, numpy or tensor).")
    pixels = to_image_batch(image, "image", 3) * 2 - 1
    h, w = pixels.shape[-2:]
    height = h if height is None else height
    width = w if width is None else width
    if not inpaint:
        if (height, width) != (h, w):
            raise ValueError(
                f"`height` x `width` ({height}x{width}) differ from the size of `image` ({h}x{w}): image-to-image "
                "keeps the image's size (leave them out). To paint a larger canvas around it, use the inpainting "
                "pipeline (`from_pipe`) with `height`/`width`; to change its size, resize the image first."
            )
        return EditInputs(pixels, None, height, width, strength)
    if not (is_integer(height) and is_integer(width)):
        raise ValueError(f"`height` and `width` must be integers, got ({height!r}, {width!r}).")
    top, left = check_offset(image_offset, (h, w), (height, width))
    if (height, width) != (h, w) and strength < 1:
        raise ValueError(
            f"`strength` must be 1.0 when painting a canvas ({height}x{width}) larger than `image` ({h}x{w}): the new "
            f"area has no pixels to start from, got strength {strength}. To keep some of a rough fill, put it in "
            "`image` at the canvas size yourself."
        )
    if mask_image is None:
        if (height, width) == (h, w):
            raise ValueError(
                "`mask_image` is required (white = repaint, black = keep) unless the canvas `height` x `width` is "
                "larger than `image` (outpainting): as given, nothing would be painted."
            )
        mask = torch.zeros(1, 1, h, w)
    else:
        mask = to_image_batch(mask_image, "mask_image", 1)
        if tuple(mask.shape[-2:]) != (h, w):
            raise ValueError(
                f"`mask_image` is {mask.shape[-2]}x{mask.shape[-1]} but `image` is {h}x{w}: "
                "masks are not resized (a resized mask would blur its edge); give the mask the image's size, e.g. "
                "`mask.resize(image.size, PIL.Image.NEAREST)`."
            )
        if mask.shape[0] not in (1, pixels.shape[0]):
            raise ValueError(
                f"`mask_image` holds {mask.shape[0]} masks for {pixels.shape[0]} images: one for all, or one each."
            )
    canvas = torch.zeros(pixels.shape[0], 3, height, width)
    canvas[..., top : top + h, left : left + w] = pixels
    repaint = torch.ones(mask.shape[0], 1, height, width)
    repaint[..., top : top + h, left : left + w] = mask
    return EditInputs(canvas, repaint, height, width, strength)


class PixNerdEditingMixin:
    """The steps an editing call adds to a PixNerd pipeline's sampling: the batch of inputs and the call's state
    (`start_edit`, before the condition is encoded), then the schedule cut by `strength`, the initial latents from the
    noised input and the kept region (`sample_edit`, through `denoise(keep=...)`)."""

    def start_edit(self, edit: EditInputs, sampling, batch_size: int, num_images_per_prompt: int, attention_kwargs):
        """After `check_inputs`: a call that runs no step fails before any work; sets the call's state; returns the
        inputs, one per image of the call, on the execution device."""
        strength_start(sampling.num_inference_steps, edit.strength)
        self._guidance_scale = sampling.guidance_scale
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        return edit.for_batch(batch_size // num_images_per_prompt, num_images_per_prompt, self._execution_device)

    def sample_edit(
        self,
        edit: EditInputs,
        sampling,
        batch_size: int,
        condition,
        uncondition,
        *,
        generator,
        latents,
        output_type: str,
        return_dict: bool,
        attention_kwargs,
        callback_on_step_end,
        callback_on_step_end_tensor_inputs,
    ):
        """Steps 3 to 6 of an editing call (checked inputs, encoded conditions): noise -> the input noised to the
        first sigma `edit.strength` runs from -> the denoising loop, keeping the unmasked region -> images."""
        device = self._execution_device
        # 3. The schedule, cut by `strength` (the scheduler starts inside it).
        timesteps = retrieve_timesteps(self.scheduler, sampling.num_inference_steps, device, sampling.sigmas)
        start = strength_start(sampling.num_inference_steps, edit.strength)
        timesteps = timesteps[start * self.scheduler.order :]
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(start * self.scheduler.order)

        # 4. Initial latents: the input noised to the first sigma (pure noise at strength 1).
        noise = self.prepare_latents(batch_size, sampling.height, sampling.width, generator, latents, device)
        latents = self.scheduler.scale_noise(edit.pixels, timesteps[:1], noise)
        keep = None if edit.mask is None else KeepRegion(edit.pixels, edit.mask, noise)

        # 5. Denoising loop; an inpainting call puts the kept region back after each step.
        latents = self.denoise(
            latents,
            timesteps,
            condition,
            uncondition,
            guidance_interval=sampling.guidance_interval,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            keep=keep,
        )

        # 6. Post-process: pixels to images.
        return self.postprocess(latents, output_type, return_dict)
