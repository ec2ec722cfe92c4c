# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The checks of the sampling arguments both pipelines take, and the defaults of the ones a call leaves out."""

import inspect
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..schedulers.scheduling_pixnerd import check_sigmas
from ..utils import check_guidance_interval, is_integer, is_real

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass(frozen=True)
class SamplingSettings:
    """A call's sampling settings, those it left out filled in (see `sampling_settings`)."""

    height: int
    width: int
    num_inference_steps: int
    sigmas: list[float] | None  # checked (`check_sigmas`); `None`: the scheduler's own grid
    guidance_scale: float
    guidance_interval: tuple[float, float]


def sampling_settings(
    pipeline, *, height, width, num_inference_steps, sigmas, guidance_scale, guidance_interval, latents
) -> SamplingSettings:
    """The settings of a call of `pipeline`: `None` arguments take the size of `latents` (else the transformer's
    trained size), the length of `sigmas` and the scheduler config's sampling settings. Checks `sigmas`,
    `guidance_scale` and `guidance_interval`, which decide the other defaults or what the pipeline checks next."""
    if pipeline.transformer is None:
        raise ValueError(
            f"This {type(pipeline).__name__} has no `transformer`; load one (e.g. `from_pretrained(...)` without "
            "`transformer=None`) to generate images."
        )
    config, size = pipeline.scheduler.config, pipeline.transformer.config.sample_size
    if isinstance(latents, torch.Tensor) and latents.ndim == 4:  # the size of the given noise
        height = latents.shape[-2] if height is None else height
        width = latents.shape[-1] if width is None else width
    if sigmas is not None:
        sigmas = check_sigmas(sigmas).tolist()
        if "sigmas" not in inspect.signature(pipeline.scheduler.set_timesteps).parameters:
            raise ValueError(
                f"`sigmas`: the scheduler {type(pipeline.scheduler).__name__} takes no custom sigmas in "
                "`set_timesteps`; use a `PixNerdFlowMatchScheduler` or a `FlowMatchEulerDiscreteScheduler`."
            )
        if num_inference_steps is not None and num_inference_steps != len(sigmas):
            raise ValueError(
                f"`num_inference_steps` ({num_inference_steps!r}) must equal `len(sigmas)` ({len(sigmas)}), or be "
                "left out: custom `sigmas` set the number of steps."
            )
        num_inference_steps = len(sigmas)
    if num_inference_steps is None:
        num_inference_steps = config.get("num_inference_steps", 50)
    if guidance_interval is None:
        guidance_interval = (config.get("guidance_interval_min", 0.0), config.get("guidance_interval_max", 1.0))
    if guidance_scale is None:
        guidance_scale = config.get("guidance_scale", 4.0)
    if not is_real(guidance_scale) or not math.isfinite(guidance_scale):
        raise ValueError(
            f"`guidance_scale` must be a finite number, got {guidance_scale!r} (from the call, or else the scheduler "
            "config's `guidance_scale`)."
        )
    return SamplingSettings(
        height=size if height is None else height,
        width=size if width is None else width,
        num_inference_steps=num_inference_steps,
        sigmas=sigmas,
        guidance_scale=float(guidance_scale),
        guidance_interval=check_guidance_interval_pair(guidance_interval),
    )


def check_sampling_inputs(
    pipeline,
    settings: SamplingSettings,
    *,
    batch_size,
    num_images_per_prompt,
    generator,
    latents,
    output_type,
    callback_on_step_end_tensor_inputs,
    trained_grid: bool | None = None,
) -> None:
    """The arguments of a call of `pipeline` that both pipelines take, for `batch_size` images: a `ValueError` naming
    the first wrong one. The image size must be a multiple of the transformer's `size_multiple(trained_grid)`."""
    height, width, num_inference_steps = settings.height, settings.width, settings.num_inference_steps
    if not is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
    if not (is_integer(height) and is_integer(width)):
        raise ValueError(f"`height` and `width` must be integers, got ({height!r}, {width!r}).")
    multiple = pipeline.transformer.size_multiple(trained_grid)
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        grid = " with `trained_grid=True`" if trained_grid else ""
        raise ValueError(
            f"`height` and `width` must be positive multiples of {multiple}{grid}, got ({height}, {width})."
        )
    if not is_integer(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
    check_generator(generator, batch_size)
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise ValueError(
            f"`latents` must be a torch.Tensor (e.g. `torch.from_numpy(array)`), got {type(latents).__name__}."
        )
    expected = (batch_size, pipeline.transformer.config.in_channels, height, width)
    if latents is not None and tuple(latents.shape) != expected:
        raise ValueError(
            f"`latents` must have shape {expected}, got {tuple(latents.shape)} (`height` and `width` default to "
            "the size of `latents`)."
        )
    if latents is not None and not torch.isfinite(latents).all():
        raise ValueError("`latents` contain NaN or infinite values.")
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
    allowed = pipeline._callback_tensor_inputs
    unknown = set(callback_on_step_end_tensor_inputs or []) - set(allowed)
    if unknown:
        raise ValueError(f"`callback_on_step_end_tensor_inputs` must be in {allowed}, got {sorted(unknown)}.")
    few_step_warnings(pipeline, settings)


def few_step_warnings(pipeline, settings: SamplingSettings) -> None:
    """Warns when a call with a few-step (distilled) adapter active leaves the sampler it was made for: guidance on
    (the guidance is baked in; CFG doubles the calls and over-saturates), or a step count it was not trained for."""
    found = pipeline.active_few_step_sampler() if hasattr(pipeline, "active_few_step_sampler") else None
    if found is None:
        return
    name, sampler = found
    if settings.guidance_scale > 1.0:
        warnings.warn(
            f"The few-step LoRA {name!r} was distilled with the guidance baked in, to sample with "
            f"`guidance_scale=1.0`; this call guides with {settings.guidance_scale} (twice the transformer calls, "
            "over-guided images).",
            UserWarning,
            stacklevel=4,
        )
    if settings.num_inference_steps not in sampler["distilled_steps"]:
        warnings.warn(
            f"The few-step LoRA {name!r} was trained for {sampler['distilled_steps']} steps; this call runs "
            f"{settings.num_inference_steps} (`num_inference_steps`), which it was not trained for.",
            UserWarning,
            stacklevel=4,
        )


def check_guidance_interval_pair(guidance_interval) -> tuple[float, float]:
    """`guidance_interval` as `(min, max)` floats: a pair of finite real numbers (a tuple, list, 1-D array or
    tensor), within `0 <= min <= max <= 1` (`check_guidance_interval`)."""
    values = guidance_interval
    if isinstance(values, (torch.Tensor, np.ndarray)):
        values = values.tolist()
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 2
        or not all(is_real(v) and math.isfinite(v) for v in values)
    ):
        raise ValueError(
            "`guidance_interval` must be a pair of numbers (min, max) in the paper's time t (0 = noise, 1 = data), "
            f"e.g. (0.1, 1.0), got {guidance_interval!r}."
        )
    check_guidance_interval(*values)
    return float(values[0]), float(values[1])


def check_generator(generator, batch_size: int) -> None:
    """`generator` is `None`, a `torch.Generator` or a list of one per image."""
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        wrong = next(g for g in generators if not isinstance(g, torch.Generator))
        where = "a list holding " if isinstance(generator, list) else ""
        raise ValueError(
            "`generator` must be a torch.Generator (a seed 0 is `torch.Generator().manual_seed(0)`) or a list of one "
            f"per image, got {where}{type(wrong).__name__} {wrong!r}."
        )
    if isinstance(generator, list) and len(generator) != batch_size:
        raise ValueError(
            f"`generator` is a list of {len(generator)} generators; expected one per image ({batch_size})."
        )
