# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""LoRA weights for the PixNerd pipelines: diffusers' LoRA loader for the transformer and the Qwen3 text encoder, plus
the sampler a few-step (distilled) LoRA was made for."""

import contextlib
import json
import os

from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, SanaLoraLoaderMixin

# Written beside the weights of a distilled model (`training/distill.py`): the sampler it was trained for.
FEW_STEP_SAMPLER_FILE = "few_step_sampler.json"
FEW_STEP_SCHEDULER_KEYS = ("solver_order", "shift", "num_inference_steps", "guidance_scale")


def few_step_sampler_settings(source, **hub_kwargs) -> dict | None:
    """The few-step sampler of a LoRA `source` (a folder, or a Hub repo that holds `FEW_STEP_SAMPLER_FILE`), `None`
    for other LoRAs (a file, a state dict, a folder or repo without it)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, FEW_STEP_SAMPLER_FILE)
        if not os.path.isfile(path):
            return None
    elif os.path.exists(path) or path.count("/") != 1:
        return None  # a weights file, or not a repo id
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        options = {k: hub_kwargs[k] for k in ("cache_dir", "token", "revision", "local_files_only") if k in hub_kwargs}
        try:
            path = hf_hub_download(path, FEW_STEP_SAMPLER_FILE, **options)
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
    with open(path, encoding="utf-8") as f:
        settings = json.load(f)
    missing = [k for k in FEW_STEP_SCHEDULER_KEYS + ("distilled_steps",) if k not in settings]
    if missing:
        raise ValueError(f"{path}: a few-step sampler file without {missing}.")
    return settings


def add_text_encoder_adapter(text_encoder, config, adapter_name: str = "default"):
    """Adds a PEFT LoRA adapter to a transformers text encoder through PEFT itself (`inject_adapter_in_model`): the
    same layers as transformers' `add_adapter`, without its PEFT integration, which asks for a newer PEFT than some
    transformers versions ship with. The adapter configs are kept in `text_encoder.peft_config`, by name."""
    from peft import inject_adapter_in_model

    configs = dict(getattr(text_encoder, "peft_config", None) or {})
    if adapter_name in configs:
        raise ValueError(f"The text encoder already has an adapter named {adapter_name!r}.")
    if hasattr(text_encoder, "peft_config"):  # PEFT would warn about it and keep only the newest config there
        del text_encoder.peft_config
    inject_adapter_in_model(config, text_encoder, adapter_name=adapter_name)
    text_encoder.peft_config = {**configs, adapter_name: config}
    return text_encoder


def load_text_encoder_adapter(text_encoder, state_dict: dict, metadata: dict | None, adapter_name, lora_scale=1.0):
    """Loads the `text_encoder.` LoRA weights of a diffusers-format state dict (and their config, from `metadata` or
    the weights' shapes, as diffusers builds it) into `text_encoder` as the adapter `adapter_name`; returns its name."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, scale_lora_layers
    from diffusers.utils.peft_utils import _create_lora_config, get_adapter_name
    from peft import set_peft_model_state_dict

    prefix = "text_encoder."
    weights = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if metadata is not None:
        metadata = {k.removeprefix(prefix): v for k, v in metadata.items() if k.startswith(prefix)} or None
    # Embedding adapters (`lora_embedding_A`/`_B`, e.g. on `embed_tokens`) are stored under PEFT's own names, which
    # diffusers' key conversion does not know; the linear layers' keys go through it.
    embeddings = {k: v for k, v in weights.items() if ".lora_embedding_" in k}
    linear = {k: v for k, v in weights.items() if k not in embeddings}
    weights = {**(convert_state_dict_to_peft(convert_state_dict_to_diffusers(linear)) if linear else {}), **embeddings}
    rank = {k: v.shape[1] for k, v in weights.items() if k.endswith(("lora_B.weight", "lora_embedding_B"))}
    config = _create_lora_config(weights, None, metadata, rank, is_unet=False)
    adapter_name = adapter_name or get_adapter_name(text_encoder)
    add_text_encoder_adapter(text_encoder, config, adapter_name)
    result = set_peft_model_state_dict(text_encoder, weights, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ValueError(f"LoRA weights for modules the text encoder does not have, e.g. {unexpected[0]!r}.")
    scale_lora_layers(text_encoder, weight=lora_scale)
    text_encoder.to(device=text_encoder.device, dtype=text_encoder.dtype)
    return adapter_name


class PixNerdLoraLoaderMixin(SanaLoraLoaderMixin):
    """`load_lora_weights`, `save_lora_weights`, `fuse_lora`, `unfuse_lora`, `set_adapters` for the transformer and,
    in the text-to-image pipelines, the text encoder.

    The diffusers LoRA format: `transformer.<module>.lora_A.weight` keys (diffusers' transformer loader, as Sana's; nothing
    in it is Sana-specific) and `text_encoder.<module>.lora_A.weight` keys in the same file (diffusers' text-encoder
    loader, as Flux's and SD3's), each with its adapter config as metadata. A distilled LoRA's folder also holds the
    sampler it was made for; `load_lora_weights` remembers it per adapter (`few_step_adapters`), and the pipelines warn
    when a call with that adapter active leaves it (`few_step_warnings`).
    """

    # The text encoder joins while it carries adapters (`_with_text_encoder`): diffusers' LoRA tests and helpers then
    # see a transformer-only loader, as before, on a pipeline without text-encoder adapters.
    _lora_loadable_modules = ["transformer"]
    text_encoder_name = "text_encoder"

    @contextlib.contextmanager
    def _with_text_encoder(self):
        """Within: `_lora_loadable_modules` lists the text encoder too when it carries adapters."""
        widened = "_lora_loadable_modules" in self.__dict__  # an inner call (set_adapters -> get_list_adapters)
        if widened or not getattr(getattr(self, "text_encoder", None), "peft_config", None):
            yield
            return
        self._lora_loadable_modules = [*type(self)._lora_loadable_modules, self.text_encoder_name]
        try:
            yield
        finally:
            del self._lora_loadable_modules

    def set_adapters(self, *args, **kwargs):
        """diffusers' `set_adapters`, on the text encoder's adapters too."""
        with self._with_text_encoder():
            return super().set_adapters(*args, **kwargs)

    def unload_lora_weights(self, *args, **kwargs):
        """diffusers' `unload_lora_weights`, the text encoder's adapters too."""
        with self._with_text_encoder():
            return super().unload_lora_weights(*args, **kwargs)

    def get_list_adapters(self):
        with self._with_text_encoder():
            return super().get_list_adapters()

    def delete_adapters(self, *args, **kwargs):
        with self._with_text_encoder():
            return super().delete_adapters(*args, **kwargs)

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, hotswap=False, **kwargs):
        """Loads the LoRA weights of a folder, file, Hub repo or state dict into the transformer and, for
        `text_encoder.` keys, into the text encoder (see diffusers' `load_lora_weights`)."""
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", _LOW_CPU_MEM_USAGE_DEFAULT_LORA)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            source = source.copy()
        state_dict, metadata = self.lora_state_dict(source, return_lora_metadata=True, **kwargs)
        if not all("lora" in key for key in state_dict):
            raise ValueError("Invalid LoRA checkpoint: every parameter name must contain 'lora'.")
        transformer = getattr(self, "transformer", None)
        before = set(getattr(transformer, "peft_config", None) or {})
        text_keys = any(key.startswith(f"{self.text_encoder_name}.") for key in state_dict)
        if text_keys and getattr(self, "text_encoder", None) is None:
            raise ValueError(
                "These LoRA weights hold text-encoder adapters (`text_encoder.` keys), but this pipeline has no "
                "`text_encoder`: load the pipeline with its text encoder."
            )
        if any(key.startswith(f"{self.transformer_name}.") for key in state_dict) or not text_keys:
            self.load_lora_into_transformer(
                state_dict,
                transformer=transformer,
                adapter_name=adapter_name,
                metadata=metadata,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                hotswap=hotswap,
            )
        if text_keys:
            if hotswap:
                raise ValueError("`hotswap=True` swaps transformer adapters only, not the text encoder's.")
            # The transformer's adapter name (`default_N` when none was given), so that both parts are one adapter.
            added = set(getattr(transformer, "peft_config", None) or {}) - before
            name = adapter_name or (next(iter(added)) if len(added) == 1 else None)
            load_text_encoder_adapter(self.text_encoder, state_dict, metadata, name, self.lora_scale)
        settings = few_step_sampler_settings(pretrained_model_name_or_path_or_dict, **kwargs)
        if settings is not None:
            for name in set(getattr(transformer, "peft_config", None) or {}) - before:
                self.few_step_adapters[name] = settings

    @classmethod
    def save_lora_weights(
        cls,
        save_directory,
        transformer_lora_layers=None,
        text_encoder_lora_layers=None,
        is_main_process: bool = True,
        weight_name: str = None,
        save_function=None,
        safe_serialization: bool = True,
        transformer_lora_adapter_metadata=None,
        text_encoder_lora_adapter_metadata=None,
    ):
        """Writes the transformer's and the text encoder's LoRA layers (either may be left out) into one file."""
        layers, metadata = {}, {}
        for name, state, config in (
            (cls.transformer_name, transformer_lora_layers, transformer_lora_adapter_metadata),
            (cls.text_encoder_name, text_encoder_lora_layers, text_encoder_lora_adapter_metadata),
        ):
            if state:
                layers[name], metadata[name] = state, config
        if not layers:
            raise ValueError("Pass at least one of `transformer_lora_layers` and `text_encoder_lora_layers`.")
        cls._save_lora_weights(
            save_directory=save_directory,
            lora_layers=layers,
            lora_metadata=metadata,
            is_main_process=is_main_process,
            weight_name=weight_name,
            save_function=save_function,
            safe_serialization=safe_serialization,
        )

    def fuse_lora(self, components: list[str] = ["transformer", "text_encoder"], lora_scale: float = 1.0, **kwargs):
        """Fuses the loaded LoRA layers into the weights of `components` (those that carry adapters)."""
        with self._with_text_encoder():
            components = [c for c in components if c in self._lora_loadable_modules]
            super(SanaLoraLoaderMixin, self).fuse_lora(components=components, lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, components: list[str] = ["transformer", "text_encoder"], **kwargs):
        """Undoes `fuse_lora` on `components` (those that carry adapters)."""
        with self._with_text_encoder():
            components = [c for c in components if c in self._lora_loadable_modules]
            super(SanaLoraLoaderMixin, self).unfuse_lora(components=components, **kwargs)

    @property
    def few_step_adapters(self) -> dict:
        """The sampler settings of each loaded few-step adapter, by adapter name."""
        if not hasattr(self, "_few_step_adapters"):
            self._few_step_adapters = {}
        return self._few_step_adapters

    def active_few_step_sampler(self) -> tuple[str, dict] | None:
        """`(adapter name, sampler settings)` of an active few-step adapter, `None` without one."""
        if not self.few_step_adapters or not getattr(self.transformer, "peft_config", None):
            return None
        for name in self.get_active_adapters():
            if name in self.few_step_adapters:
                return name, self.few_step_adapters[name]
        return None
