# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""LoRA weights for the PixNerd pipelines: diffusers' transformer-only LoRA loader, plus the sampler a few-step
(distilled) LoRA was made for."""

import json
import os

from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin

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


class PixNerdLoraLoaderMixin(SanaLoraLoaderMixin):
    """`load_lora_weights`, `save_lora_weights`, `fuse_lora`, `unfuse_lora`, `set_adapters` for the transformer.

    Nothing in diffusers' transformer-only LoRA loader is Sana-specific: the diffusers LoRA format
    (`transformer.<module>.lora_A.weight`) applies to any PEFT-enabled transformer. A distilled LoRA's folder also
    holds the sampler it was made for; `load_lora_weights` remembers it per adapter (`few_step_adapters`), and the
    pipelines warn when a call with that adapter active leaves it (`few_step_warnings`).
    """

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        transformer = getattr(self, "transformer", None)
        before = set(getattr(transformer, "peft_config", None) or {})
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        settings = few_step_sampler_settings(pretrained_model_name_or_path_or_dict, **kwargs)
        if settings is not None:
            for name in set(getattr(self.transformer, "peft_config", None) or {}) - before:
                self.few_step_adapters[name] = settings

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
