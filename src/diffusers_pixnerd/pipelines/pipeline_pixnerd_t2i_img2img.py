# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Text-guided PixNerd image-to-image: an image noised part of the way, then sampled towards a prompt."""

from typing import Any, Callable

import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from .editing import PixNerdEditingMixin, edit_inputs
from .pipeline_pixnerd_t2i import PixNerdT2IPipeline
from .pipeline_utils import Conditioning

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from PIL import Image
        >>> from diffusers_pixnerd import PixNerdT2IImg2ImgPipeline, PixNerdT2IPipeline

        >>> pipe = PixNerdT2IPipeline.from_pretrained("MCG-NJU/PixNerd-XXL-P16-T2I", dtype=torch.bfloat16).to("cuda")
        >>> edit = PixNerdT2IImg2ImgPipeline.from_pipe(pipe)  # the same weights, no copy
        >>> image = Image.open("fox.png").convert("RGB").resize((512, 512))
        >>> out = edit("a watercolour painting of a fox", image=image, strength=0.6).images[0]
        ```
"""


class PixNerdT2IImg2ImgPipeline(PixNerdEditingMixin, PixNerdT2IPipeline):
    r"""
    Text-guided image-to-image with PixNerd ([paper](https://arxiv.org/abs/2507.23268)): the image is noised to the
    sigma that `strength` starts from and sampled from there towards the prompt. Pixel space: no VAE round trip.

    Built from a [`PixNerdT2IPipeline`] with `PixNerdT2IImg2ImgPipeline.from_pipe(pipe)` (sharing its components), or
    with `from_pretrained` on the same folders. It takes the same components as [`PixNerdT2IPipeline`].
    """

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.6,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        max_sequence_length: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Samples images of the prompts starting from `image`.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompts; or pass `prompt_embeds`.
            image (`PIL.Image.Image`, `np.ndarray`, `torch.Tensor` or a list of them):
                The image to start from: one for all prompts or one per prompt. PIL images in any mode (converted to
                RGB); numpy (H, W[, C]) or (N, H, W, C) and tensors (C, H, W) or (N, C, H, W), uint8 in 0..255 or
                floats in [0, 1] (a tensor with negative values is read as [-1, 1]). Its size is the output's, a
                multiple of `transformer.resolution_multiple`; it is never resized.
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
            negative_prompt, sigmas, guidance_scale, guidance_interval, num_images_per_prompt, generator,
            prompt_embeds, negative_prompt_embeds, output_type, return_dict, attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, max_sequence_length:
                As in [`PixNerdT2IPipeline.__call__`].
            latents (`torch.Tensor`, *optional*):
                The noise mixed into the image, `(batch, 3, height, width)`, instead of drawing it from `generator`.

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the edited images.
        """
        return self._edit(
            prompt, image, None, None, strength, negative_prompt, height, width, num_inference_steps, sigmas,
            guidance_scale, guidance_interval, num_images_per_prompt, generator, latents, prompt_embeds,
            negative_prompt_embeds, output_type, return_dict, attention_kwargs, callback_on_step_end,
            callback_on_step_end_tensor_inputs, max_sequence_length, inpaint=False,
        )  # fmt: skip

    def _edit(
        self, prompt, image, mask_image, image_offset, strength, negative_prompt, height, width, num_inference_steps,
        sigmas, guidance_scale, guidance_interval, num_images_per_prompt, generator, latents, prompt_embeds,
        negative_prompt_embeds, output_type, return_dict, attention_kwargs, callback_on_step_end,
        callback_on_step_end_tensor_inputs, max_sequence_length, *, inpaint,
    ):  # fmt: skip
        """The editing call of both text-guided editing pipelines (`inpaint`: with a mask and a canvas)."""
        # 1. Check inputs: the image (and mask) on the canvas, then what `PixNerdT2IPipeline` checks.
        edit = edit_inputs(image, mask_image, height, width, image_offset, strength, inpaint=inpaint)
        sampling, batch_size = self.check_inputs(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
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
        )
        edit = self.start_edit(edit, sampling, batch_size, num_images_per_prompt, attention_kwargs)
        device = self._execution_device

        # 2. Encode the prompts, and the negative prompts for guidance.
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            negative_prompt,
            do_classifier_free_guidance=self.do_classifier_free_guidance,
            num_images_per_prompt=num_images_per_prompt,
            device=device,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            max_sequence_length=max_sequence_length,
        )

        # 3.-6. Schedule, noised input, denoising loop, images.
        return self.sample_edit(
            edit,
            sampling,
            batch_size,
            Conditioning(encoder_hidden_states=prompt_embeds),
            Conditioning(encoder_hidden_states=negative_prompt_embeds),
            generator=generator,
            latents=latents,
            output_type=output_type,
            return_dict=return_dict,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )
