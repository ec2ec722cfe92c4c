# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""LoRA weights for the PixNerd pipelines: diffusers' transformer-only LoRA loader, which also reads older files."""

from diffusers.loaders.lora_pipeline import SanaLoraLoaderMixin
from diffusers.utils import logging

from .attention_layout import has_fused_attention_keys, unfuse_attention_keys, unfuse_target_modules

logger = logging.get_logger(__name__)


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
