# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""`load_pipeline`: any PixNerd model (folder, Hub repo, official repo or checkpoint file) as the pipeline of its kind,
ready to sample (LoRA, device, step cache, compilation)."""

import dataclasses
import functools
import os

import torch
from diffusers import DiffusionPipeline

from ..loaders import check_local_path, official_pipeline_folder
from ..loaders.lora_pipeline import FEW_STEP_SCHEDULER_KEYS
from ..models.cache import cache_config, parse_cache_spec
from ..utils import is_real
from .official import convert_official_pipeline
from .pipeline_pixnerd import PixNerdPipeline
from .pipeline_pixnerd_img2img import PixNerdImg2ImgPipeline
from .pipeline_pixnerd_inpaint import PixNerdInpaintPipeline
from .pipeline_pixnerd_t2i import PixNerdT2IPipeline
from .pipeline_pixnerd_t2i_img2img import PixNerdT2IImg2ImgPipeline
from .pipeline_pixnerd_t2i_inpaint import PixNerdT2IInpaintPipeline

PIPELINE_CLASSES = {
    cls.__name__: cls
    for cls in (
        PixNerdPipeline,
        PixNerdT2IPipeline,
        PixNerdImg2ImgPipeline,
        PixNerdInpaintPipeline,
        PixNerdT2IImg2ImgPipeline,
        PixNerdT2IInpaintPipeline,
    )
}
COMPILE_MODES = (None, "none", "regional", "full")
# The `from_pretrained` options that decide where an official repo's conversion is cached.
OFFICIAL_REPO_OPTIONS = ("checkpoint_name", "ema", "sample_size", "cache_dir", "token", "revision")
HUB_OPTIONS = ("cache_dir", "token", "revision", "local_files_only")


def check_compile_mode(mode) -> None:
    """`mode` is one of `COMPILE_MODES`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"`compile` must be None, 'none', 'regional' or 'full', got {mode!r}.")


def compile_transformer(transformer, mode: str | None) -> None:
    """`torch.compile` in place: `"regional"` compiles each repeated DiT block (`compile_repeated_blocks`, compiled once
    and reused by every block), `"full"` the whole transformer; `None` or `"none"` leaves it eager."""
    check_compile_mode(mode)
    if mode == "regional":
        transformer.compile_repeated_blocks(fullgraph=True)
    elif mode == "full":
        transformer.compile(fullgraph=True)


def pipeline_class(model: str | os.PathLike, **kwargs) -> type[PixNerdPipeline] | type[PixNerdT2IPipeline]:
    """The pipeline class of a folder or Hub repo: the one its `model_index.json` names or, for an official repo or
    folder (a Lightning checkpoint, no `model_index.json`), the one of its checkpoint's kind. An official repo is
    converted here, once, into the cache that `from_pretrained` then reads (`loaders.official_pipeline_folder`);
    `kwargs` are `from_pretrained`'s, of which the Hub and conversion options are used."""
    name = os.fspath(model)
    hub = {k: kwargs[k] for k in HUB_OPTIONS if kwargs.get(k) is not None}
    offline = bool(hub.get("local_files_only"))
    check_local_path(name, "model_index.json", hub.get("cache_dir"), hub.get("revision"), offline, argument="model")
    options = {k: kwargs[k] for k in OFFICIAL_REPO_OPTIONS if k in kwargs}
    # Converted without the optional components, as `from_pretrained` converts: both write the same cache folder.
    convert = functools.partial(convert_official_pipeline, text_encoder=None)
    converted = official_pipeline_folder(name, convert, **options)
    if converted is None and os.path.isdir(name) and not os.path.isfile(os.path.join(name, "model_index.json")):
        raise FileNotFoundError(
            f"`model` {name!r} is a folder with neither a model_index.json (a saved pipeline) nor an official .ckpt "
            "checkpoint."
        )
    class_name = DiffusionPipeline.load_config(converted or name, **hub).get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(
            f"`model` {name!r} holds a {class_name} (its model_index.json), not one of {sorted(PIPELINE_CLASSES)}: "
            "load it with `diffusers.DiffusionPipeline.from_pretrained`."
        )
    return PIPELINE_CLASSES[class_name]


def apply_few_step_sampler(pipe, sampler: dict | None = None) -> bool:
    """With a few-step (distilled) LoRA active, its sampler (`few_step_sampler.json`: steps, guidance scale, solver,
    shift) becomes the defaults of `pipe`'s scheduler; a call's arguments still override them. `sampler`: these
    settings given (e.g. a distillation run's, for one of its checkpoints). Returns whether one was applied."""
    if sampler is None:
        found = pipe.active_few_step_sampler()
        if found is None:
            return False
        sampler = found[1]
    settings = {k: sampler[k] for k in FEW_STEP_SCHEDULER_KEYS}
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **settings)
    return True


def check_load_inputs(model, lora, lora_scale, cache, compile) -> None:
    """The arguments of `load_pipeline` that can be checked before anything is loaded."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"`model` must be a path or Hub repo id (a string), got {type(model).__name__} {model!r}.")
    if lora is not None and not isinstance(lora, (str, os.PathLike, dict)):
        raise ValueError(f"`lora` must be a path, Hub repo id or state dict, got {type(lora).__name__}.")
    if lora_scale is not None:
        if lora is None:
            raise ValueError(f"`lora_scale` {lora_scale!r} is given without `lora`: pass the LoRA weights too.")
        if not is_real(lora_scale):
            raise ValueError(f"`lora_scale` must be a number, got {type(lora_scale).__name__} {lora_scale!r}.")
    if isinstance(cache, str):
        parse_cache_spec(cache)
    elif cache is not None and not dataclasses.is_dataclass(cache):
        raise ValueError(
            f"`cache` must be a spec such as 'first_block:threshold=0.2' or a diffusers cache config, got {cache!r}."
        )
    check_compile_mode(compile)


def load_pipeline(
    model: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    lora: str | os.PathLike | dict | None = None,
    lora_scale: float | None = None,
    cache=None,
    compile: str | None = None,
    **kwargs,
) -> PixNerdPipeline | PixNerdT2IPipeline:
    r"""
    Loads any PixNerd model as the pipeline of its kind, `PixNerdPipeline` (class-conditional) or `PixNerdT2IPipeline`
    (text-to-image), ready to sample.

    The class comes from the model (see `pipeline_class`); loading is that class's `from_pretrained`, which also
    converts official repos (once, then cached), or `convert_official_pipeline` for a checkpoint file.

    Args:
        model (`str` or `os.PathLike`):
            A saved pipeline folder, a Hub repo id (diffusers format, or an official one such as
            "MCG-NJU/PixNerd-XL-P16-C2I"), an official folder holding a `.ckpt`, or an official checkpoint file.
        dtype (`torch.dtype`, *optional*):
            The dtype of the transformer (and, for the official text-to-image model, of its Qwen3 text encoder).
        device (`str` or `torch.device`, *optional*):
            Where the pipeline is moved after loading; by default it stays on the CPU.
        lora (`str`, `os.PathLike` or `dict`, *optional*):
            LoRA weights (folder, file, Hub repo or state dict) loaded with `load_lora_weights`. A few-step
            (distilled) LoRA's folder holds the sampler it was made for (`few_step_sampler.json`): it becomes the
            scheduler's default (steps, guidance scale, solver, shift), which a call's arguments still override.
        lora_scale (`float`, *optional*):
            The scale of `lora` (`set_adapters`), 1 by default.
        cache (`str` or a diffusers cache config, *optional*):
            A step cache for the transformer: a config, or a spec `NAME[:key=value,...]` (`first_block`,
            `taylorseer`, `pab`, `mag`; see `models.cache.cache_config`), e.g. "first_block:threshold=0.2".
        compile (`str`, *optional*):
            "regional" (each DiT block, `compile_repeated_blocks`) or "full" (the whole transformer); compiled with
            `fullgraph=True` on the first call.
        kwargs:
            Passed to `from_pretrained` (e.g. `cache_dir`, `revision`, `sample_size`, `text_encoder`) or, for a
            checkpoint file, to `convert_official_pipeline`.

    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pixnerd import load_pipeline

        >>> pipe = load_pipeline("MCG-NJU/PixNerd-XL-P16-C2I", dtype=torch.bfloat16, device="cuda", compile="regional")
        >>> image = pipe(class_labels="golden retriever").images[0]
        ```
    """
    check_load_inputs(model, lora, lora_scale, cache, compile)
    if os.path.isfile(model):
        pipe = convert_official_pipeline(os.fspath(model), dtype=dtype, **kwargs)
    else:
        pipe = pipeline_class(model, **kwargs).from_pretrained(model, dtype=dtype, **kwargs)
    if lora is not None:
        pipe.load_lora_weights(lora)
        if lora_scale is not None:
            pipe.set_adapters(pipe.get_active_adapters(), lora_scale)
        apply_few_step_sampler(pipe)
    if device is not None:
        pipe.to(device)
    if cache is not None:
        pipe.transformer.enable_cache(cache_config(cache, pipe) if isinstance(cache, str) else cache)
    compile_transformer(pipe.transformer, compile)
    return pipe
