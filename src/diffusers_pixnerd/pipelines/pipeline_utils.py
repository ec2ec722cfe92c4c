# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The denoising loop shared by the class-conditional and the text-to-image PixNerd pipelines."""

import functools
import inspect
import math
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import create_repo

from ..loaders import check_local_path, official_pipeline_folder, resolve_dtype
from ..loaders.attention_layout import has_fused_attention_keys, unfuse_attention_keys, unfuse_target_modules
from ..models.transformer_pixnerd import PixNerdTransformer2DModel
from ..schedulers.scheduling_pixnerd import check_guidance_interval, is_integer, is_real

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
EXTRA_START, EXTRA_END = "<!-- model-card-extra:start -->", "<!-- model-card-extra:end -->"
CARD_MARKER = "<!-- Model card written by diffusers-pixnerd: rewritten when the folder is saved again. -->"


def write_model_card(folder: str, card: str) -> bool:
    """Writes `card` as `folder/README.md` unless a README.md that is not ours is there: a file the user wrote is
    never overwritten (a warning says so). Ours carry `CARD_MARKER` (or the extra-section markers). Returns whether
    the card was written."""
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            existing = f.read()
        if CARD_MARKER not in existing and EXTRA_START not in existing:
            logger.warning(
                "%s exists and was not written by diffusers-pixnerd: kept as it is, no model card written. Delete "
                "it (or save to another folder) to get the generated card.",
                path,
            )
            return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return True


def shown_path(name_or_path: str) -> str:
    """A Hub id or a path as a model card shows it: as given, except an absolute local path, which becomes its last
    component. A card is meant to be shared: where a folder was on the training machine works nowhere else (and may
    name a user), while a relative path or a folder name still tells the reader what to pass."""
    name_or_path = os.fspath(name_or_path)
    return os.path.basename(os.path.normpath(name_or_path)) if os.path.isabs(name_or_path) else name_or_path


def check_sigmas(sigmas) -> list[float]:
    """Custom `sigmas` of a pipeline call as a list of floats: a non-empty, strictly decreasing 1-D sequence of finite
    values in (0, 1], the unshifted sigmas of the N steps without the final 0 (the scheduler shifts them and appends
    it), as `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)` takes them."""
    values = None
    if not isinstance(sigmas, (str, bytes)):
        try:
            values = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
        except (TypeError, ValueError, RuntimeError):
            pass
    if (
        values is None
        or values.ndim != 1
        or values.numel() == 0
        or not torch.isfinite(values).all()
        or (values <= 0).any()
        or (values > 1).any()
        or (values.diff() >= 0).any()
    ):
        raise ValueError(
            "`sigmas` must be a non-empty, strictly decreasing 1-D sequence of finite values in (0, 1] (the N steps, "
            f"without the final 0), got {sigmas!r}."
        )
    return values.tolist()


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


MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")


def read_model_card_extra(folder: str) -> tuple[str, list[str], str | None]:
    """The extra section (training settings, samples) of our model card in `folder`, the local image files it shows
    and its `base_model`, so that saving or pushing a loaded pipeline keeps them. `("", [], None)` without such a card.
    """
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return "", [], None
    with open(path, encoding="utf-8") as f:
        card = f.read()
    if EXTRA_START not in card or EXTRA_END not in card:
        return "", [], None
    extra = card.split(EXTRA_START, 1)[1].split(EXTRA_END, 1)[0].strip("\n")
    images = [m for m in MARKDOWN_IMAGE.findall(extra) if "://" not in m and os.path.isfile(os.path.join(folder, m))]
    base_model = re.search(r"^base_model: (\S+)$", card.split("\n---", 1)[0], re.MULTILINE)
    return extra, [os.path.join(folder, m) for m in images], base_model.group(1) if base_model else None


class PixNerdLoraLoaderMixin(SanaLoraLoaderMixin):
    """`load_lora_weights`, `save_lora_weights`, `fuse_lora`, `unfuse_lora`, `set_adapters` for the transformer.

    Nothing in diffusers' transformer-only LoRA loader is Sana-specific: the diffusers LoRA format
    (`transformer.<module>.lora_A.weight`) applies to any PEFT-enabled transformer. LoRAs saved for the fused
    attention layout (`to_qkv`, `add_kv_proj`, `to_out`; diffusers-pixnerd < 0.2) are converted on load, exactly.
    """

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        return_metadata = kwargs.get("return_lora_metadata", False)
        out = super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        state_dict, metadata = out if return_metadata else (out, None)
        if has_fused_attention_keys(state_dict):
            logger.info("LoRA in the fused attention layout (to_qkv, add_kv_proj, to_out): converted to to_q/k/v.")
            state_dict = unfuse_attention_keys(state_dict)
            if metadata and metadata.get("transformer.target_modules") is not None:
                metadata = {
                    **metadata,
                    "transformer.target_modules": unfuse_target_modules(metadata["transformer.target_modules"]),
                }
        return (state_dict, metadata) if return_metadata else state_dict


# Written beside every saved pipeline: diffusers' custom-pipeline file, so that `DiffusionPipeline.from_pretrained(
# folder_or_repo, custom_pipeline="pipeline_pixnerd", trust_remote_code=True)` loads it without importing this package
# first. It only imports the installed package (`model_index.json` keeps a plain class name, so the package's own
# `from_pretrained` needs no remote code).
LOADER_NAME = "pipeline_pixnerd"
LOADER_FILE = """# diffusers custom-pipeline file of a diffusers-pixnerd folder; it needs `pip install diffusers-pixnerd`:
#     from diffusers import DiffusionPipeline
#     pipe = DiffusionPipeline.from_pretrained(<this folder or repo>, custom_pipeline="{name}", trust_remote_code=True)
from diffusers_pixnerd import {class_name}  # noqa: F401
"""


def write_loader_file(folder: str, class_name: str) -> str:
    """Writes `pipeline_pixnerd.py` (see `LOADER_FILE`) into a pipeline folder; returns its path."""
    path = os.path.join(folder, f"{LOADER_NAME}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(LOADER_FILE.format(name=LOADER_NAME, class_name=class_name))
    return path


MODEL_CARD = """---
library_name: diffusers
license: mit
pipeline_tag: {pipeline_tag}
{base_model_line}tags:
- diffusers-pixnerd
- pixnerd
- pixel-diffusion
- {task_tag}
---

{marker}
# {title}

A [PixNerd](https://arxiv.org/abs/2507.23268) (Pixel Neural Field Diffusion) pipeline for the `diffusers-pixnerd`
package: a diffusion transformer on pixels, no VAE, whose output head is a per-patch neural field (official code:
github.com/MCG-NJU/PixNerd). Install `diffusers-pixnerd`, then:

```py
import torch
from diffusers_pixnerd import {class_name}

pipe = {class_name}.from_pretrained("{repo_id}")
image = pipe({example_input}, generator=torch.Generator().manual_seed(0)).images[0]
```

With the package installed, diffusers alone loads it too, through the `{loader}` file beside the weights:
`DiffusionPipeline.from_pretrained("{repo_id}", custom_pipeline="{loader_name}", trust_remote_code=True)`.

Sampling defaults (scheduler config): {sampling}. Trained resolution {size}x{size}.

<!-- model-card-extra:start -->
{extra}
<!-- model-card-extra:end -->
## Citation

```bibtex
@inproceedings{{wang2026pixnerd,
  title={{PixNerd: Pixel Neural Field Diffusion}},
  author={{Wang, Shuai and Gao, Ziteng and Zhu, Chenhui and Huang, Weilin and Wang, Limin}},
  booktitle={{ICLR}},
  year={{2026}}
}}
```
"""


class PixNerdBasePipeline(DiffusionPipeline, PixNerdLoraLoaderMixin):
    """Sampling in pixel space: noise -> flow ODE with interval classifier-free guidance -> images."""

    model_cpu_offload_seq = "transformer"
    _callback_tensor_inputs = ["latents"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """`DiffusionPipeline.from_pretrained`, which also takes an official PixNerd Hub repo or folder holding a
        Lightning checkpoint and no `model_index.json` (e.g. "MCG-NJU/PixNerd-XL-P16-C2I"): it is converted once by
        `from_single_file` and cached (see `loaders.official_pipeline_folder`; options `checkpoint_name`, `ema`,
        `sample_size`). The text-to-image pipeline then loads Qwen/Qwen3-1.7B as its text encoder unless
        `text_encoder` is given.
        """
        options = {k: kwargs.pop(k) for k in ("checkpoint_name", "ema", "sample_size") if k in kwargs}
        hub = {k: kwargs.get(k) for k in ("cache_dir", "token", "revision")}
        # The cache holds the required components; optional ones (the text encoder) are loaded separately.
        convert = functools.partial(cls.from_single_file, **dict.fromkeys(cls._optional_components))
        converted = official_pipeline_folder(str(pretrained_model_name_or_path), convert, **options, **hub)
        if converted is not None:
            pretrained_model_name_or_path = converted
            kwargs = cls._official_default_components(kwargs)
        else:
            offline = bool(kwargs.get("local_files_only"))
            path = pretrained_model_name_or_path
            check_local_path(path, "model_index.json", hub["cache_dir"], hub["revision"], offline)
        pipeline = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if os.path.isdir(pretrained_model_name_or_path):  # keep the card's training section and samples
            pipeline._model_card_source = (os.fspath(pretrained_model_name_or_path),)
        return pipeline

    @classmethod
    def _official_default_components(cls, kwargs: dict) -> dict:
        """`from_pretrained` kwargs for a converted official folder: the components the conversion left out."""
        return kwargs

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str,
        ema: bool = True,
        sample_size: int | None = None,
        dtype: torch.dtype | None = None,
        scheduler_preset: str | None = None,
        *,
        torch_dtype: torch.dtype | None = None,
        **kwargs,
    ):
        """A complete pipeline from an official checkpoint (local path, `org/repo/file.ckpt` or Hub URL): the
        transformer from `PixNerdTransformer2DModel.from_single_file` (options `ema`, `sample_size`, `dtype` (or
        the older `torch_dtype`) and Hub download options), the scheduler from `PixNerdFlowMatchScheduler.from_official_preset`
        (`scheduler_preset`, by default the paper's setting for the checkpoint), and the pipeline's optional
        components (`text_encoder`, `tokenizer`) from `kwargs`.
        """
        components = {k: kwargs.pop(k) for k in ("text_encoder", "tokenizer") if k in kwargs}
        dtype = resolve_dtype(dtype, torch_dtype)
        transformer = PixNerdTransformer2DModel.from_single_file(
            pretrained_model_link_or_path, ema=ema, sample_size=sample_size, dtype=dtype, **kwargs
        )
        expected = "PixNerdT2IPipeline" if transformer.is_text_conditional else "PixNerdPipeline"
        if expected != cls.__name__:
            raise ValueError(f"{pretrained_model_link_or_path!r} is a checkpoint for {expected}, not {cls.__name__}.")
        unknown = sorted(set(components) - set(cls._optional_components))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_single_file() got unexpected keyword argument(s) {unknown}.")
        return cls.from_official_transformer(transformer, scheduler_preset, dtype, **components)

    @classmethod
    def from_official_transformer(cls, transformer, scheduler_preset=None, dtype=None, **components):
        """The pipeline around a converted official transformer, with the paper's sampler settings."""
        raise NotImplementedError

    @staticmethod
    def check_transformer(transformer) -> None:
        """`transformer` is a `PixNerdTransformer2DModel` (or `None`): another diffusers model, e.g. a UNet named in a
        folder's `model_index.json`, is a clear error rather than an AttributeError later."""
        model = getattr(transformer, "_orig_mod", transformer)  # under torch.compile's wrapper
        if model is not None and not isinstance(model, PixNerdTransformer2DModel):
            raise ValueError(
                f"`transformer` must be a PixNerdTransformer2DModel, got a {type(model).__name__} (in a saved folder: "
                "the class named for `transformer` in model_index.json and transformer/config.json)."
            )

    def __init__(self):
        super().__init__()
        # Pixels in [-1, 1] to images in [0, 1]; no VAE (scale factor 1).
        self.image_processor = VaeImageProcessor(vae_scale_factor=1, do_normalize=True)
        # The state of the running (or last) call, for callbacks; see the properties below.
        self._guidance_scale, self._num_timesteps, self._interrupt = None, None, False
        self._attention_kwargs, self._current_timestep = None, None

    @property
    def guidance_scale(self) -> float | None:
        """The classifier-free guidance scale of the running (or last) call."""
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the running call guides at all (`guidance_scale > 1`); the guidance interval picks the steps."""
        return self._guidance_scale is not None and self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int | None:
        """The number of denoising steps of the running (or last) call."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` (e.g. in a callback) to skip the remaining steps of the running call."""
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        """The `attention_kwargs` of the running (or last) call."""
        return self._attention_kwargs

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep of the denoising step being run (an entry of `scheduler.timesteps`); `None` outside the loop."""
        return self._current_timestep

    def _defaults(
        self, height, width, num_inference_steps, guidance_scale, guidance_interval, latents=None, sigmas=None
    ):
        """`None` arguments take the size of `latents` (else the transformer's trained size), the length of `sigmas`
        and the scheduler config's sampling settings. Returns them with `sigmas` checked (`check_sigmas`)."""
        if self.transformer is None:
            raise ValueError(
                f"This {type(self).__name__} has no `transformer`; load one (e.g. `from_pretrained(...)` without "
                "`transformer=None`) to generate images."
            )
        config, size = self.scheduler.config, self.transformer.config.sample_size
        if isinstance(latents, torch.Tensor) and latents.ndim == 4:  # the size of the given noise
            height = latents.shape[-2] if height is None else height
            width = latents.shape[-1] if width is None else width
        if sigmas is not None:
            sigmas = check_sigmas(sigmas)
            if "sigmas" not in inspect.signature(self.scheduler.set_timesteps).parameters:
                raise ValueError(
                    f"`sigmas`: the scheduler {type(self.scheduler).__name__} takes no custom sigmas in "
                    "`set_timesteps`; use a `PixNerdFlowMatchScheduler` or a `FlowMatchEulerDiscreteScheduler`."
                )
            if num_inference_steps is not None and num_inference_steps != len(sigmas):
                raise ValueError(
                    f"`num_inference_steps` ({num_inference_steps!r}) must equal `len(sigmas)` ({len(sigmas)}), or be "
                    "left out: custom `sigmas` set the number of steps."
                )
            num_inference_steps = len(sigmas)
        if guidance_interval is None:
            guidance_interval = (config.get("guidance_interval_min", 0.0), config.get("guidance_interval_max", 1.0))
        if guidance_scale is None:
            guidance_scale = config.get("guidance_scale", 4.0)
        if not is_real(guidance_scale) or not math.isfinite(guidance_scale):
            raise ValueError(
                f"`guidance_scale` must be a finite number, got {guidance_scale!r} (from the call, or else the scheduler "
                "config's `guidance_scale`)."
            )
        return (
            size if height is None else height,
            size if width is None else width,
            num_inference_steps if num_inference_steps is not None else config.get("num_inference_steps", 50),
            float(guidance_scale),
            check_guidance_interval_pair(guidance_interval),
            sigmas,
        )

    def check_common_inputs(
        self,
        num_images_per_prompt,
        batch_size,
        height,
        width,
        num_inference_steps,
        guidance_interval,
        generator,
        latents,
        output_type,
        callback_on_step_end_tensor_inputs,
    ):
        if not is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
            raise ValueError(f"`num_images_per_prompt` must be a positive integer, got {num_images_per_prompt!r}.")
        if not (is_integer(height) and is_integer(width)):
            raise ValueError(f"`height` and `width` must be integers, got ({height!r}, {width!r}).")
        multiple = self.transformer.resolution_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"`height` and `width` must be positive multiples of {multiple}, got ({height}, {width})."
            )
        if not is_integer(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        check_guidance_interval_pair(guidance_interval)
        check_generator(generator, batch_size)
        expected = (batch_size, self.transformer.config.in_channels, height, width)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(
                f"`latents` must have shape {expected}, got {tuple(latents.shape)} (`height` and `width` default to "
                "the size of `latents`)."
            )
        if latents is not None and not torch.isfinite(latents).all():
            raise ValueError("`latents` contain NaN or infinite values.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be in {self._callback_tensor_inputs}, got {sorted(unknown)}."
            )

    def prepare_latents(self, batch_size, height, width, generator, latents, device) -> torch.Tensor:
        """Initial noise in float32, drawn on the CPU so that a seed gives the same image on any device."""
        if latents is None:
            shape = (batch_size, self.transformer.config.in_channels, height, width)
            latents = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=torch.float32)
        return latents.to(device=device, dtype=torch.float32)

    def guidance_active(self, timestep: torch.Tensor, guidance_interval: tuple[float, float]) -> bool:
        """Whether CFG applies at `timestep`: the scheduler's rule, or `min < 1 - sigma < max` for other schedulers."""
        if self.guidance_scale <= 1.0:
            return False
        if hasattr(self.scheduler, "is_guidance_active"):
            return self.scheduler.is_guidance_active(timestep, guidance_interval=guidance_interval)
        t = 1.0 - float(timestep) / self.scheduler.config.num_train_timesteps
        return guidance_interval[0] < t < guidance_interval[1]

    def denoise(
        self,
        latents: torch.Tensor,
        condition: dict[str, torch.Tensor],
        uncondition: dict[str, torch.Tensor],
        num_inference_steps: int,
        guidance_interval: tuple[float, float],
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
        attention_kwargs: dict[str, Any] | None = None,
        sigmas: list[float] | None = None,
        callback_conditions: dict[str, tuple[str, str]] | None = None,
    ) -> torch.Tensor:
        """The sampling loop: the batch is [uncond, cond] where guidance is active, cond alone elsewhere. While the
        transformer has a cache enabled (`enable_cache`), each branch is a separate call in its own cache context.
        At any image size the transformer keeps its trained token grid (`trained_grid=True`): other sizes are decoded
        by the neural field in larger or smaller patches, in both variants.

        `sigmas` (see `check_sigmas`) replace the scheduler's own grid of `num_inference_steps` steps.
        `callback_conditions` names the condition tensors that `callback_on_step_end` may read and replace, as
        `{callback name: ("condition" or "uncondition", key)}`, e.g. `{"prompt_embeds": ("condition",
        "encoder_hidden_states")}`.
        """
        device, dtype = latents.device, self.transformer.dtype
        if sigmas is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(sigmas=sigmas, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        batch_size = latents.shape[0]
        conditions = {"condition": dict(condition), "uncondition": dict(uncondition)}
        condition, uncondition = conditions["condition"], conditions["uncondition"]
        callback_conditions = callback_conditions or {}
        # Concatenated once: steps inside the interval reuse it (until a callback replaces a condition).
        guided = {k: torch.cat([uncondition[k], condition[k]]) for k in uncondition}

        cached = getattr(self.transformer, "is_cache_enabled", False)
        if cached:
            self.transformer._reset_stateful_cache()  # a sampling interrupted by an error left its states
        self._current_timestep = None
        try:
            with self.progress_bar(total=len(timesteps)) as progress_bar:
                for i, t in enumerate(timesteps):
                    if self.interrupt:
                        continue
                    self._current_timestep = t
                    active = self.guidance_active(t, guidance_interval)
                    if cached:
                        # One call per branch, each in its own cache context: a cache then sees a constant batch.
                        noise_pred = self._predict_in_context("cond", i, t, latents, condition, attention_kwargs)
                        if active:
                            noise_uncond = self._predict_in_context(
                                "uncond", i, t, latents, uncondition, attention_kwargs
                            )
                            noise_pred = noise_uncond + self.guidance_scale * (noise_pred - noise_uncond)
                    else:
                        model_input = torch.cat([latents, latents]) if active else latents
                        noise_pred = self.transformer(
                            model_input.to(dtype),
                            t.expand(model_input.shape[0]),
                            **(guided if active else condition),
                            attention_kwargs=attention_kwargs,
                            trained_grid=True,
                        ).sample.float()
                        if active:
                            noise_uncond, noise_cond = noise_pred.chunk(2)
                            noise_pred = noise_uncond + self.guidance_scale * (noise_cond - noise_uncond)
                    latents = self.scheduler.step(noise_pred, t, latents).prev_sample

                    if callback_on_step_end is not None:
                        tensors = {"latents": latents}
                        for name, (which, key) in callback_conditions.items():
                            tensors[name] = conditions[which].get(key)
                        callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                        callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                        if not isinstance(callback_outputs, dict):
                            raise ValueError(
                                "`callback_on_step_end` must return a dict (e.g. the `callback_kwargs` it was given), "
                                f"got {type(callback_outputs).__name__}."
                            )
                        latents = callback_outputs.pop("latents", latents)
                        if latents.shape[0] != batch_size:
                            raise ValueError("The callback returned `latents` with another batch size.")
                        if self._replace_conditions(callback_outputs, conditions, callback_conditions):
                            guided = {k: torch.cat([uncondition[k], condition[k]]) for k in uncondition}
                    progress_bar.update()
        finally:
            self._current_timestep = None
        return latents

    def _predict_in_context(self, name, step_index, t, latents, condition, attention_kwargs) -> torch.Tensor:
        """One branch's velocity in float32, computed inside the transformer's cache context `name`."""
        sigma = float(t) / self.scheduler.config.num_train_timesteps
        with self.transformer.cache_context(
            name, step_index=step_index, num_inference_steps=self._num_timesteps, timestep=t, sigma=sigma
        ):
            return self.transformer(
                latents.to(self.transformer.dtype),
                t.expand(latents.shape[0]),
                **condition,
                attention_kwargs=attention_kwargs,
                trained_grid=True,
            ).sample.float()

    @staticmethod
    def _replace_conditions(
        callback_outputs: dict, conditions: dict[str, dict], callback_conditions: dict[str, tuple[str, str]]
    ) -> bool:
        """Takes the condition tensors a callback returned (in the dtype and on the device of the ones they replace);
        whether any changed. A condition the call does not use (the unconditional one without guidance) is left out.
        """
        changed = False
        for name, (which, key) in callback_conditions.items():
            old = conditions[which].get(key)
            new = callback_outputs.pop(name, old)
            if old is None or new is old:
                continue
            if not isinstance(new, torch.Tensor) or new.shape != old.shape:
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise ValueError(f"The callback returned `{name}` of shape {got}; expected {tuple(old.shape)}.")
            conditions[which][key] = new.to(device=old.device, dtype=old.dtype)
            changed = True
        return changed

    def model_card(
        self, repo_id: str | None = None, extra: str = "", base_model: str | None = None, folder: str | None = None
    ) -> str:
        """The README.md written beside the pipeline: library, tags, usage, sampling defaults, the paper; `base_model`
        (a Hub repo id) for a fine-tuned model. The usage loads `repo_id`, else the local `folder` it is saved in (as
        `shown_path` writes it)."""
        text = self.transformer.is_text_conditional
        config = self.scheduler.config
        sampling = ", ".join(
            f"{k} {config[k]}"
            for k in ("num_inference_steps", "guidance_scale", "shift", "solver_order")
            if k in config
        )
        return MODEL_CARD.format(
            marker=CARD_MARKER,
            pipeline_tag="text-to-image" if text else "unconditional-image-generation",
            base_model_line=f"base_model: {base_model}\n" if base_model else "",
            task_tag="text-to-image" if text else "class-conditional-image-generation",
            title=repo_id or f"PixNerd {'text-to-image' if text else 'class-conditional'} pipeline",
            class_name=type(self).__name__,
            loader=f"{LOADER_NAME}.py",
            loader_name=LOADER_NAME,
            repo_id=repo_id or (shown_path(folder) if folder else "path/to/this/folder"),
            example_input='"a red fox in the snow"' if text else "class_labels=[0]",
            sampling=sampling or "see scheduler/scheduler_config.json",
            size=self.transformer.config.sample_size,
            extra=extra,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        push_to_hub: bool = False,
        repo_id: str | None = None,
        model_card_extra: str = "",
        base_model: str | None = None,
        **kwargs,
    ):
        """`DiffusionPipeline.save_pretrained` plus a model card (README.md); `push_to_hub=True` uploads the folder.

        `model_card_extra` is markdown added to the card (training settings, sample images, ...).
        """
        hub_kwargs = {k: kwargs.pop(k) for k in ("token", "private", "commit_message", "create_pr") if k in kwargs}
        super().save_pretrained(save_directory, push_to_hub=False, **kwargs)
        if push_to_hub and repo_id is None:
            repo_id = os.path.basename(os.path.normpath(save_directory))
        if not model_card_extra and getattr(self, "_model_card_source", None):
            # A loaded pipeline saved again: its card's training section and the sample images it shows come along.
            source = self._model_card_source[0]
            model_card_extra, images, source_base_model = read_model_card_extra(source)
            base_model = base_model or source_base_model
            for image in images:
                target = os.path.join(save_directory, os.path.relpath(image, source))
                if os.path.abspath(image) != os.path.abspath(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    shutil.copyfile(image, target)
        write_model_card(save_directory, self.model_card(repo_id, model_card_extra, base_model, save_directory))
        if type(self).__module__.split(".")[0] == "diffusers_pixnerd":  # a subclass elsewhere has its own code
            write_loader_file(save_directory, type(self).__name__)
        if push_to_hub:
            return self._push_folder(save_directory, repo_id, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        commit_message: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        create_pr: bool = False,
        **save_kwargs,
    ):
        """Saves the whole pipeline (with its model card) to a temporary folder and uploads it to `repo_id`."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, repo_id=repo_id, **save_kwargs)
            return self._push_folder(folder, repo_id, commit_message, private, token, create_pr)

    def _push_folder(self, folder, repo_id, commit_message=None, private=None, token=None, create_pr=False):
        repo_id = create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
        return self._upload_folder(folder, repo_id, token=token, commit_message=commit_message, create_pr=create_pr)

    def postprocess(self, latents: torch.Tensor, output_type: str, return_dict: bool):
        """Raw [-1, 1] pixels for "latent", else images in [0, 1] as PIL, numpy or torch."""
        images = latents if output_type == "latent" else self.image_processor.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
