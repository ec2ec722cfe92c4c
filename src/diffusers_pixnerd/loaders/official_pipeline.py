# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""`from_pretrained` and `from_single_file` of the PixNerd pipelines for official checkpoints: a Hub repo or folder
holding a Lightning `.ckpt` (converted once and cached), or a single official file."""

import functools
import os

import torch

from .official_repo import check_local_path, official_pipeline_folder


class FromOfficialPipelineMixin:
    """Official PixNerd checkpoints for a `DiffusionPipeline` subclass whose `__init__` names its transformer class
    (a model with `FromOfficialCheckpointMixin`) and which implements `from_official_transformer`."""

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
        if os.path.isdir(pretrained_model_name_or_path):  # `save_pretrained` keeps its card's training section
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
        **kwargs,
    ):
        """A complete pipeline from an official checkpoint (local path, `org/repo/file.ckpt` or Hub URL): the
        transformer from `PixNerdTransformer2DModel.from_single_file` (options `ema`, `sample_size`, `dtype` and Hub
        download options), the scheduler from `PixNerdFlowMatchScheduler.from_official_preset` (`scheduler_preset`,
        by default the paper's setting for the checkpoint), and the pipeline's optional components (`text_encoder`,
        `tokenizer`) from `kwargs`.
        """
        components = {k: kwargs.pop(k) for k in ("text_encoder", "tokenizer") if k in kwargs}
        # The transformer class as the pipeline's `__init__` annotates it (how diffusers' single-file loader finds
        # component classes): this layer does not import the models.
        transformer_class = cls._get_signature_types()["transformer"][0]
        transformer = transformer_class.from_single_file(
            pretrained_model_link_or_path, ema=ema, sample_size=sample_size, dtype=dtype, **kwargs
        )
        # The text pipelines (generation and editing) are those with a text encoder.
        if transformer.is_text_conditional != ("text_encoder" in cls._get_signature_keys(cls)[0]):
            expected = "PixNerdT2IPipeline" if transformer.is_text_conditional else "PixNerdPipeline"
            raise ValueError(f"{pretrained_model_link_or_path!r} is a checkpoint for {expected}, not {cls.__name__}.")
        unknown = sorted(set(components) - set(cls._optional_components))
        if unknown:
            raise TypeError(f"{cls.__name__}.from_single_file() got unexpected keyword argument(s) {unknown}.")
        return cls.from_official_transformer(transformer, scheduler_preset, dtype, **components)

    @classmethod
    def from_official_transformer(cls, transformer, scheduler_preset=None, dtype=None, **components):
        """The pipeline around a converted official transformer, with the paper's sampler settings."""
        raise NotImplementedError
