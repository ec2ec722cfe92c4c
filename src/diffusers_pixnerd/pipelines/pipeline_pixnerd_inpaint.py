# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Class-conditional PixNerd inpainting and outpainting: the masked pixels (and any canvas around the image) are
sampled, the others come back exactly as they went in."""

from typing import Any, Callable

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from .pipeline_pixnerd_img2img import PixNerdImg2ImgPipeline

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_pixnerd import PixNerdInpaintPipeline

        >>> pipe = PixNerdInpaintPipeline.from_pretrained("MCG-NJU/PixNerd-XL-P16-C2I")
        >>> image = Image.open("dog.png").convert("RGB").resize((256, 256))
        >>> mask = Image.new("L", (256, 256), 0)
        >>> mask.paste(255, (64, 64, 192, 192))  # white = repaint
        >>> out = pipe(class_labels="golden retriever", image=image, mask_image=mask).images[0]
        >>> wide = pipe(class_labels="golden retriever", image=image, width=512, image_offset=(0, 0)).images[0]
        ```
"""


class PixNerdInpaintPipeline(PixNerdImg2ImgPipeline):
    r"""
    Class-conditional inpainting and outpainting with PixNerd ([paper](https://arxiv.org/abs/2507.23268)): pixels where
    `mask_image` is white are sampled, the others follow the noised input during sampling and are the input's pixels
    exactly at the end (pixel space, no VAE); a canvas larger than the image is painted around it.

    Built from a [`PixNerdPipeline`] with `PixNerdInpaintPipeline.from_pipe(pipe)` (sharing its components), or with
    `from_pretrained` on the same folders. It takes the same components as [`PixNerdPipeline`].
    """

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | list[list[int]] | np.ndarray | torch.Tensor,
        image=None,
        mask_image=None,
        strength: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        image_offset: tuple[int, int] | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        trained_grid: bool = False,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Repaints the masked pixels of `image` (and paints the canvas around it) as images of the given classes.

        Args:
            class_labels (`int`, `str`, `list`, `np.ndarray` or `torch.Tensor`):
                Class ids or names, as [`PixNerdPipeline`] takes them.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image, as [`PixNerdImg2ImgPipeline`] takes it; never resized.
            mask_image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them, *optional*):
                What to repaint, of the image's size: white (1) = repaint, black (0) = keep. PIL images in any mode
                (converted to "L"); numpy (H, W), (H, W, 1) or (N, H, W, 1) and tensors (H, W), (1, H, W) or
                (N, 1, H, W), uint8 in 0..255 or floats in [0, 1]; one channel only. Grays are soft: a pixel of mask
                value m is `m * sampled + (1 - m) * input` at every step and at the end. Optional when the canvas is
                larger than the image (outpainting: the whole image is kept).
            strength (`float`, defaults to 1.0):
                How much of the schedule runs, in (0, 1] (see [`PixNerdImg2ImgPipeline`]): 1 samples the masked
                region from pure noise; lower keeps some of what the image has there. Must be 1 for outpainting.
            height (`int`, *optional*):
                The canvas height, a multiple of `transformer.size_multiple(trained_grid)`; defaults to the image's.
            width (`int`, *optional*):
                The canvas width; defaults to the image's. A canvas larger than the image is outpainting: the area
                beyond the image is always painted.
            image_offset (`tuple[int, int]`, *optional*):
                `(top, left)` of the image on the canvas; defaults to the centre.
            num_inference_steps, sigmas, guidance_scale, guidance_interval, num_images_per_prompt, generator, latents,
            output_type, return_dict, attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs,
            trained_grid:
                As in [`PixNerdImg2ImgPipeline.__call__`].

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the images; their kept pixels equal the input's (byte for byte in
            "pil" output).
        """
        return self._edit(
            class_labels, image, mask_image, image_offset, strength, height, width, num_inference_steps, sigmas,
            guidance_scale, guidance_interval, num_images_per_prompt, generator, latents, output_type, return_dict,
            attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, trained_grid, inpaint=True,
        )  # fmt: skip
