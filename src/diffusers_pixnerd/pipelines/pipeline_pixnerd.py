# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Class-conditional PixNerd pipeline (ImageNet, or any label set stored in `id2label`)."""

import difflib
import json
import os
import reprlib
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import replace_example_docstring

from ..models.transformer_pixnerd import PixNerdTransformer2DModel
from ..schedulers.scheduling_pixnerd import PixNerdFlowMatchScheduler
from ..utils import is_integer
from .input_checks import SamplingSettings, check_sampling_inputs, sampling_settings
from .pipeline_utils import Conditioning, PixNerdBasePipeline, retrieve_timesteps

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pixnerd import PixNerdPipeline

        >>> pipe = PixNerdPipeline.from_pretrained("MCG-NJU/PixNerd-XL-P16-C2I")
        >>> image = pipe(class_labels="golden retriever", generator=torch.Generator().manual_seed(0)).images[0]
        >>> image.save("golden_retriever.png")
        ```
"""


def imagenet_id2label() -> dict[str, str]:
    """The 1000 ImageNet-1k class names (WordNet lemmas, comma-separated synonyms), keyed by class id."""
    with open(os.path.join(os.path.dirname(__file__), "imagenet_id2label.json"), encoding="utf-8") as f:
        return json.load(f)


class PixNerdPipeline(PixNerdBasePipeline):
    r"""
    Class-conditional image generation with PixNerd ([paper](https://arxiv.org/abs/2507.23268)): a pixel-space
    diffusion transformer, no VAE.

    This model inherits from [`DiffusionPipeline`]. Check the superclass documentation for the generic methods
    implemented for all pipelines (downloading, saving, running on a particular device, etc.).

    Parameters:
        transformer ([`PixNerdTransformer2DModel`]):
            A class-conditional PixNerd transformer.
        scheduler ([`PixNerdFlowMatchScheduler`] or [`FlowMatchEulerDiscreteScheduler`]):
            The sampler; a [`PixNerdFlowMatchScheduler`] config also carries the default steps, guidance scale and
            guidance interval of the checkpoint.
        id2label (`dict[str, str]`, *optional*):
            Class names by id (comma-separated synonyms allowed), saved with the pipeline. `class_labels` may then be
            names.
    """

    @classmethod
    def from_official_transformer(cls, transformer, scheduler_preset=None, dtype=None):
        """The paper's class-conditional sampler ("c2i-euler100" unless `scheduler_preset` says otherwise), with the
        ImageNet class names for a 1000-class model."""
        scheduler = PixNerdFlowMatchScheduler.from_official_preset(scheduler_preset or "c2i-euler100")
        id2label = imagenet_id2label() if transformer.config.num_classes == 1000 else None
        return cls(transformer=transformer, scheduler=scheduler, id2label=id2label)

    def __init__(
        self,
        transformer: PixNerdTransformer2DModel,
        scheduler: PixNerdFlowMatchScheduler,
        id2label: dict[str, str] | None = None,
    ):
        super().__init__()
        self.check_transformer(transformer)
        if transformer is not None and transformer.is_text_conditional:
            raise ValueError(
                "`transformer` is a text-to-image PixNerd model; use `PixNerdT2IPipeline` (e.g. "
                "`PixNerdT2IPipeline.from_pretrained(...)`) for it."
            )
        num_classes = transformer.config.num_classes if transformer is not None else None
        if id2label is not None and not isinstance(id2label, Mapping):
            raise ValueError(
                "`id2label` must be a dict of class names by class id, e.g. {'0': 'T-shirt/top', '1': 'Trouser'} "
                f"(`dict(enumerate(names))` from a list), got a {type(id2label).__name__}: {reprlib.repr(id2label)}."
            )
        for key, value in (id2label or {}).items():
            if not str(key).isdigit() or (num_classes is not None and int(key) > num_classes):
                raise ValueError(f"`id2label` keys must be class ids in [0, {num_classes}], got {key!r}.")
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"`id2label` values must be non-empty class names, got {value!r} for {key!r}.")
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()} if id2label else None)
        self.labels = {}
        for key, value in (id2label or {}).items():
            for label in value.split(","):
                self.labels[label.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of class names (any of the comma-separated synonyms in `id2label`)."""
        ids = []
        for name in [label] if isinstance(label, str) else label:
            if name not in self.labels:
                close = difflib.get_close_matches(name, list(self.labels), n=5)
                hint = f" Close matches: {close}." if close else ""
                known = f"{len(self.labels)} known names" if self.labels else "no `id2label` in this pipeline"
                raise ValueError(f"Unknown class name {name!r} in `class_labels` ({known}).{hint}")
            ids.append(self.labels[name])
        return ids

    def _class_ids(self, class_labels) -> list[int]:
        """Class ids from the shapes `DiTPipeline` takes: an id or name, a list (or tuple) of them, a numpy array or a
        tensor of ids, and one-element lists (arrays, tensors) as entries, e.g. `[[3], [5]]` (DiT flattens those)."""
        num_classes = self.transformer.config.num_classes
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            class_labels = class_labels.tolist()
        labels = list(class_labels) if isinstance(class_labels, (list, tuple)) else [class_labels]
        if len(labels) == 0:
            raise ValueError("`class_labels` is empty.")
        ids = []
        for entry in labels:
            label = entry.tolist() if isinstance(entry, (torch.Tensor, np.ndarray)) else entry
            if isinstance(label, (list, tuple)) and len(label) == 1:  # a nested id, as in [[3], [5]]
                label = label[0]
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif is_integer(label) and 0 <= label <= num_classes:
                ids.append(int(label))  # num_classes itself is the null class: unconditional samples
            else:
                raise ValueError(
                    f"`class_labels` entries must be class names or ids in [0, {num_classes}] ({num_classes} = "
                    f"unconditional), or one-element lists of one, got {entry!r}."
                )
        return ids

    def encode_class_labels(
        self, class_labels, num_images_per_prompt: int, device: torch.device
    ) -> tuple[Conditioning, Conditioning]:
        """The conditioning of both guidance branches: the class ids, each `num_images_per_prompt` times, and the null
        class `num_classes` for the unconditional branch."""
        labels = torch.tensor(self._class_ids(class_labels), device=device).repeat_interleave(num_images_per_prompt)
        return Conditioning(class_labels=labels), Conditioning(
            class_labels=torch.full_like(labels, self.transformer.config.num_classes)
        )

    def check_inputs(
        self,
        *,
        class_labels,
        height,
        width,
        num_inference_steps,
        sigmas,
        guidance_scale,
        guidance_interval,
        num_images_per_prompt,
        generator,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
        trained_grid=False,
    ) -> tuple[SamplingSettings, int]:
        """The arguments of `__call__`: a `ValueError` naming the first wrong one. Returns the sampling settings, those
        left out filled in (`sampling_settings`), and the batch size."""
        sampling = sampling_settings(
            self,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            sigmas=sigmas,
            guidance_scale=guidance_scale,
            guidance_interval=guidance_interval,
            latents=latents,
        )
        if not isinstance(trained_grid, bool):
            raise ValueError(f"`trained_grid` must be True or False, got {trained_grid!r}.")
        batch_size = len(self._class_ids(class_labels)) * num_images_per_prompt
        check_sampling_inputs(
            self,
            sampling,
            batch_size=batch_size,
            num_images_per_prompt=num_images_per_prompt,
            generator=generator,
            latents=latents,
            output_type=output_type,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            trained_grid=trained_grid,
        )
        return sampling, batch_size

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        class_labels: int | str | list[int | str] | list[list[int]] | np.ndarray | torch.Tensor,
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
        Generates images of the given classes.

        Args:
            class_labels (`int`, `str`, `list`, `np.ndarray` or `torch.Tensor`):
                Class ids or names (see `get_label_ids`), one or a list, a 1-D array or tensor of ids, or one-element
                lists like `[[3], [5]]` (as `DiTPipeline` takes them); the id `num_classes` asks for an unconditional
                sample.
            height (`int`, *optional*):
                Image height in pixels, a multiple of `transformer.resolution_multiple` (16 for the official model);
                defaults to the height of `latents` if given, else to the model's `sample_size`. Other sizes than the
                trained one run on their own grid of `patch_size` patches (more or fewer tokens), as the official
                sampler does; see `trained_grid`.
            width (`int`, *optional*):
                Image width in pixels; defaults to the width of `latents` if given, else to the model's `sample_size`.
            num_inference_steps (`int`, *optional*):
                Sampling steps; defaults to `len(sigmas)` if given, else to the scheduler config's
                `num_inference_steps` (the checkpoint's setting).
            sigmas (`list[float]`, *optional*):
                A custom schedule: the unshifted sigmas of the steps, strictly decreasing in (0, 1], without the final
                0, passed to the scheduler's `set_timesteps(sigmas=...)`, which shifts them and appends 0
                (`np.linspace(1, 1 / N, N)` is the default grid of [`PixNerdFlowMatchScheduler`] up to float32
                rounding). It sets the number of steps; `num_inference_steps`, if given too, must equal `len(sigmas)`.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance scale; `<= 1` disables guidance. Defaults to the scheduler config's.
            guidance_interval (`tuple[float, float]`, *optional*):
                `(min, max)` in the paper's time t (0 = noise, 1 = data): guidance only where `min < t < max`.
                Defaults to the scheduler config's.
            num_images_per_prompt (`int`, defaults to 1):
                Images per class label.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Seeds the initial noise (drawn on the CPU, so a seed gives the same image on any device).
            latents (`torch.Tensor`, *optional*):
                Initial noise of shape `(batch, 3, height, width)`, instead of drawing it; it sets the image size when
                `height` and `width` are not given.
            output_type (`str`, defaults to `"pil"`):
                `"pil"`, `"np"` or `"pt"` (images in [0, 1]), or `"latent"` (the raw pixels in [-1, 1]).
            return_dict (`bool`, defaults to `True`):
                Whether to return an [`ImagePipelineOutput`] or a tuple.
            attention_kwargs (`dict`, *optional*):
                Passed to the transformer, e.g. `{"scale": 0.5}` for loaded LoRA weights.
            callback_on_step_end (`Callable`, *optional*):
                Called as `callback_on_step_end(pipe, step, timestep, callback_kwargs)` after each step; it may
                return `{"latents": ...}` to replace the latents.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                The tensors passed in `callback_kwargs`.
            trained_grid (`bool`, defaults to `False`):
                Opt-in: keep the trained token grid (`sample_size / patch_size` per side) at every size and let the
                neural field decode larger or smaller patches (as the official text-to-image demo does). Sizes must
                then be multiples of `transformer.size_multiple(True)`. On the bundled Fashion-MNIST model at twice
                its size this is the worse choice (docs/pipelines.md#other-sizes).

        Examples:

        Returns:
            [`ImagePipelineOutput`] or `tuple`: the generated images.
        """
        # 1. Check inputs; the settings left out come from `latents` (the size) and the scheduler config.
        sampling, batch_size = self.check_inputs(
            class_labels=class_labels,
            height=height,
            width=width,
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
        self._guidance_scale = sampling.guidance_scale
        self._trained_grid = trained_grid
        self._attention_kwargs = attention_kwargs
        self._interrupt = False
        device = self._execution_device

        # 2. Encode the class labels; the null class `num_classes` conditions the unconditional branch.
        condition, uncondition = self.encode_class_labels(class_labels, num_images_per_prompt, device)

        # 3. Prepare latents (the initial noise).
        latents = self.prepare_latents(batch_size, sampling.height, sampling.width, generator, latents, device)

        # 4. Prepare timesteps.
        timesteps = retrieve_timesteps(self.scheduler, sampling.num_inference_steps, device, sampling.sigmas)

        # 5. Denoising loop.
        latents = self.denoise(
            latents,
            timesteps,
            condition,
            uncondition,
            guidance_interval=sampling.guidance_interval,
            attention_kwargs=attention_kwargs,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
        )

        # 6. Post-process: pixels to images.
        return self.postprocess(latents, output_type, return_dict)
