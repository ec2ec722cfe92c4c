# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""`load_pipeline`: any PixNerd model (folder, Hub repo, official repo or checkpoint file) as the pipeline of its kind,
ready to sample (LoRA, device, step cache, compilation)."""

import dataclasses
import os

import torch
from diffusers import DiffusionPipeline

from ..loaders import check_local_path, find_official_checkpoint, is_text_to_image_checkpoint, resolve_checkpoint_file
from ..loaders.lora_pipeline import FEW_STEP_SCHEDULER_KEYS
from ..models.cache import cache_config, parse_cache_spec
from ..utils import is_real
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
# The `from_pretrained` options that decide which checkpoint of an official repo is used and where it is cached.
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
    """The pipeline class of a model, without loading or converting it: the one its `model_index.json` names (a saved
    folder, a Hub repo, an official repo's cached conversion) or, for an official checkpoint file or an official repo
    or folder not converted yet, the one of the checkpoint's kind (read from its keys). `kwargs` are
    `from_pretrained`'s, of which the Hub options and the official repo's (`checkpoint_name`, `ema`, `sample_size`)
    are used."""
    name = os.fspath(model)
    hub = {k: kwargs[k] for k in HUB_OPTIONS if kwargs.get(k) is not None}
    offline = bool(hub.get("local_files_only"))
    check_local_path(name, "model_index.json", hub.get("cache_dir"), hub.get("revision"), offline, argument="model")
    if os.path.isfile(name):
        return official_pipeline_class(name)
    found = find_official_checkpoint(name, **{k: kwargs[k] for k in OFFICIAL_REPO_OPTIONS if k in kwargs})
    if found is not None and not found.converted:
        return official_pipeline_class(found.fetch())
    if found is None and os.path.isdir(name) and not os.path.isfile(os.path.join(name, "model_index.json")):
        raise FileNotFoundError(
            f"`model` {name!r} is a folder with neither a model_index.json (a saved pipeline) nor an official .ckpt "
            "checkpoint."
        )
    class_name = DiffusionPipeline.load_config(found.folder if found else name, **hub).get("_class_name")
    if class_name not in PIPELINE_CLASSES:
        raise ValueError(
            f"`model` {name!r} holds a {class_name} (its model_index.json), not one of {sorted(PIPELINE_CLASSES)}: "
            "load it with `diffusers.DiffusionPipeline.from_pretrained`."
        )
    return PIPELINE_CLASSES[class_name]


def official_pipeline_class(checkpoint: str) -> type[PixNerdPipeline] | type[PixNerdT2IPipeline]:
    """The generation pipeline of an official checkpoint file's kind (its keys say whether it is text-to-image)."""
    return PixNerdT2IPipeline if is_text_to_image_checkpoint(checkpoint) else PixNerdPipeline


def convert_official_pipeline(checkpoint: str, **kwargs) -> PixNerdPipeline | PixNerdT2IPipeline:
    """An official checkpoint file (local path, `org/repo/file.ckpt` or Hub URL) as the pipeline of its kind:
    `PixNerdPipeline` (with ImageNet `id2label` for 1000 classes) or `PixNerdT2IPipeline` (with Qwen/Qwen3-1.7B unless
    `text_encoder` says otherwise, `None` to leave it out; `text_encoder` and `tokenizer` are not used for a
    class-conditional checkpoint). `kwargs` are the class's `from_single_file` options (`ema`, `sample_size`,
    `dtype`, `scheduler_preset`, Hub download options)."""
    hub = {k: v for k, v in kwargs.items() if k in ("cache_dir", "token", "revision", "force_download")}
    cls = official_pipeline_class(resolve_checkpoint_file(checkpoint, **hub))
    if cls is PixNerdPipeline:
        kwargs = {k: v for k, v in kwargs.items() if k not in ("text_encoder", "tokenizer")}
    return cls.from_single_file(checkpoint, **kwargs)


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
    converts official repos (once, then cached), or its `from_single_file` for an official checkpoint file.

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
            checkpoint file, to `from_single_file`.

    Examples:
        ```py
        >>> import torch
        >>> from diffusers_pixnerd import load_pipeline

        >>> pipe = load_pipeline("MCG-NJU/PixNerd-XL-P16-C2I", dtype=torch.bfloat16, device="cuda", compile="regional")
        >>> image = pipe(class_labels="golden retriever").images[0]
        ```
    """
    check_load_inputs(model, lora, lora_scale, cache, compile)
    cls = pipeline_class(model, **kwargs)
    if os.path.isfile(model):  # an official checkpoint file
        pipe = cls.from_single_file(os.fspath(model), dtype=dtype, **kwargs)
    else:
        pipe = cls.from_pretrained(model, dtype=dtype, **kwargs)
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
