"""Loading weights into the package's models and pipelines: official PixNerd checkpoints (reading them weights-only,
the key map and config inference: `official_checkpoint`; the checkpoint of an official repo or folder and the cache of
its conversion: `official_repo`; the pipelines' `from_pretrained` and `from_single_file` of them: `official_pipeline`)
and LoRA weights (`lora_pipeline`)."""

from .lora_pipeline import PixNerdLoraLoaderMixin
from .official_checkpoint import (
    FromOfficialCheckpointMixin,
    convert_state_dict,
    infer_config,
    is_text_to_image_checkpoint,
    load_official_state_dict,
    official_state_dict_for_model,
    resolve_checkpoint_file,
    sample_size_from_name,
    select_denoiser,
)
from .official_pipeline import FromOfficialPipelineMixin
from .official_repo import OfficialCheckpoint, check_local_path, find_official_checkpoint, official_pipeline_folder

__all__ = [
    "FromOfficialCheckpointMixin",
    "FromOfficialPipelineMixin",
    "OfficialCheckpoint",
    "PixNerdLoraLoaderMixin",
    "check_local_path",
    "convert_state_dict",
    "find_official_checkpoint",
    "infer_config",
    "is_text_to_image_checkpoint",
    "load_official_state_dict",
    "official_pipeline_folder",
    "official_state_dict_for_model",
    "resolve_checkpoint_file",
    "sample_size_from_name",
    "select_denoiser",
]
