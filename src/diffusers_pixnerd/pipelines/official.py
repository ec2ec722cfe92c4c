# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The public conversion functions: an official PixNerd checkpoint as our transformer, or as the pipeline of its kind."""

import torch

from ..loaders import resolve_dtype
from ..models.transformer_pixnerd import PixNerdTransformer2DModel
from .pipeline_pixnerd import PixNerdPipeline
from .pipeline_pixnerd_t2i import DEFAULT_TEXT_ENCODER, PixNerdT2IPipeline


def convert_official_pipeline(
    checkpoint: str,
    ema: bool = True,
    sample_size: int | None = None,
    dtype: torch.dtype | None = None,
    scheduler_preset: str | None = None,
    text_encoder=DEFAULT_TEXT_ENCODER,
    tokenizer=None,
    *,
    torch_dtype: torch.dtype | None = None,
    **hub_kwargs,
):
    """A complete pipeline from an official checkpoint: `PixNerdPipeline` (with ImageNet `id2label` for 1000
    classes) or `PixNerdT2IPipeline` (with `text_encoder`, a Qwen3 name/path or model, `None` to leave it out).

    The scheduler is `PixNerdFlowMatchScheduler.from_official_preset(scheduler_preset)`, by default the paper's
    setting: "c2i-euler100" for class-conditional checkpoints, "t2i" for text-to-image ones. `dtype` (or the older
    `torch_dtype`) is the dtype of the transformer (and of a text encoder loaded by name, default bfloat16).
    """
    dtype = resolve_dtype(dtype, torch_dtype)
    transformer = PixNerdTransformer2DModel.from_single_file(
        checkpoint, ema=ema, sample_size=sample_size, dtype=dtype, **hub_kwargs
    )
    if not transformer.is_text_conditional:
        return PixNerdPipeline.from_official_transformer(transformer, scheduler_preset, dtype)
    return PixNerdT2IPipeline.from_official_transformer(
        transformer, scheduler_preset, dtype, text_encoder=text_encoder, tokenizer=tokenizer
    )


def convert_official_checkpoint(
    checkpoint: str,
    ema: bool = True,
    sample_size: int | None = None,
    dtype: torch.dtype | None = None,
    *,
    torch_dtype: torch.dtype | None = None,
    **hub_kwargs,
) -> PixNerdTransformer2DModel:
    """`PixNerdTransformer2DModel.from_single_file`: the transformer of an official checkpoint (local path, Hub file
    or URL). `sample_size` is the trained resolution, not stored in the file (see `loaders.official_checkpoint`)."""
    return PixNerdTransformer2DModel.from_single_file(
        checkpoint, ema=ema, sample_size=sample_size, dtype=dtype, torch_dtype=torch_dtype, **hub_kwargs
    )
