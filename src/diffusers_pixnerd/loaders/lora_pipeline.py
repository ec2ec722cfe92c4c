# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""LoRA weights for the PixNerd pipelines: diffusers' transformer-only LoRA loader."""

from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin


class PixNerdLoraLoaderMixin(SanaLoraLoaderMixin):
    """`load_lora_weights`, `save_lora_weights`, `fuse_lora`, `unfuse_lora`, `set_adapters` for the transformer.

    Nothing in diffusers' transformer-only LoRA loader is Sana-specific: the diffusers LoRA format
    (`transformer.<module>.lora_A.weight`) applies to any PEFT-enabled transformer.
    """

