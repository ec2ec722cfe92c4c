# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Class-conditional PixNerd image-to-image: an image noised part of the way, then sampled towards a class."""

from typing import Any, Callable

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from .editing import PixNerdEditingMixin, edit_inputs
from .pipeline_pixnerd import PixNerdPipeline

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_pixnerd import PixNerdImg2ImgPipeline, PixNerdPipeline

        >>> pipe = PixNerdPipeline.from_pretrained("MCG-NJU/PixNerd-XL-P16-C2I")
        >>> edit = PixNerdImg2ImgPipeline.from_pipe(pipe)  # the same weights, no copy
        >>> image = Image.open("dog.png").convert("RGB").resize((256, 256))
        >>> out = edit(class_labels="tabby, tabby cat", image=image, strength=0.6).images[0]
        ```
"""


class PixNerdImg2ImgPipeline(PixNerdEditingMixin, PixNerdPipeline):
    r"""
    Class-conditional image-to-image with PixNerd ([paper](https://arxiv.org/abs/2507.23268)): the image is noised to
    the sigma that `strength` starts from and sampled from there towards the class. Pixel space: no VAE round trip.

    Built from a [`PixNerdPipeline`] with `PixNerdImg2ImgPipeline.from_pipe(pipe)` (sharing its components), or with
    `from_pretrained` on the same folders. It takes the same components as [`PixNerdPipeline`].
    """

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | list[list[int]] | np.ndarray | torch.Tensor,
        image=None,
        strength: float = 0.6,
        height: int | None = None,
        width: int | None = None,
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
        Samples images of the given classes starting from `image`.

        Args:
            class_labels (`int`, `str`, `list`, `np.ndarray` or `torch.Tensor`):
                Class ids or names, as [`PixNerdPipeline`] takes them.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image to start from: one for all class labels or one per label. PIL images in any mode (converted
                to RGB); numpy (H, W[, C]) or (N, H, W, C) and tensors (C, H, W) or (N, C, H, W), uint8 in 0..255 or
                floats in [0, 1] (a tensor with negative values is read as [-1, 1]). Its size is the output's, a
                multiple of `transformer.size_multiple(trained_grid)`; it is never resized.
            strength (`float`, defaults to 0.6):
                How much of the schedule runs, in (0, 1]: the image is noised to the sigma of step
                `int(N - N * strength)` of the `N = num_inference_steps` steps, and the remaining steps run (as
                diffusers counts them). 1 ignores the image.
            height (`int`, *optional*):
                Must be the image's height if given.
            width (`int`, *optional*):
                Must be the image's width if given.
            num_inference_steps (`int`, *optional*):
                Steps of the whole schedule, of which `strength` runs the last ones; defaults to the scheduler
                config's.
            sigmas, guidance_scale, guidance_interval, num_images_per_prompt, generator, output_type, return_dict,
            attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, trained_grid:
                As in [`PixNerdPipeline.__call__`].
            latents (`torch.Tensor`, *optional*):
                The noise mixed into the image, `(batch, 3, height, width)`, instead of drawing it from `generator`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the edited images.
        """
        return self._edit(
            class_labels, image, None, None, strength, height, width, num_inference_steps, sigmas, guidance_scale,
            guidance_interval, num_images_per_prompt, generator, latents, output_type, return_dict, attention_kwargs,
            callback_on_step_end, callback_on_step_end_tensor_inputs, trained_grid, inpaint=False,
        )  # fmt: skip

    def _edit(
        self, class_labels, image, mask_image, image_offset, strength, height, width, num_inference_steps, sigmas,
        guidance_scale, guidance_interval, num_images_per_prompt, generator, latents, output_type, return_dict,
        attention_kwargs, callback_on_step_end, callback_on_step_end_tensor_inputs, trained_grid, *, inpaint,
    ):  # fmt: skip
        """The editing call of both class-conditional editing pipelines (`inpaint`: with a mask and a canvas)."""
        # 1. Check inputs: the image (and mask) on the canvas, then what `PixNerdPipeline` checks.
        edit = edit_inputs(image, mask_image, height, width, image_offset, strength, inpaint=inpaint)
        sampling, batch_size = self.check_inputs(
            class_labels=class_labels,
            height=edit.height,
            width=edit.width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            trained_grid=trained_grid,
        )
        edit = self.start_edit(edit, sampling, batch_size, num_images_per_prompt, attention_kwargs)
        self._trained_grid = trained_grid
        device = self._execution_device

        # 2. Encode the class labels.
        condition, uncondition = self.encode_class_labels(class_labels, num_images_per_prompt, device)

        # 3.-6. Schedule, noised input, denoising loop, images.
        return self.sample_edit(
            edit,
            sampling,
            batch_size,
            condition,
            uncondition,
            generator=generator,
            latents=latents,
            output_type=output_type,
            return_dict=return_dict,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
