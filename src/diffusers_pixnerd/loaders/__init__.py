"""Official PixNerd checkpoints: reading them (weights only), the key map and config inference
(`official_checkpoint`), and the conversion cache of official repos and folders (`official_repo`)."""

from .official_checkpoint import (
    FromOfficialCheckpointMixin,
    convert_state_dict,
    infer_config,
    load_official_state_dict,
    official_state_dict_for_model,
    resolve_checkpoint_file,
    sample_size_from_name,
    select_denoiser,
)
from .official_repo import official_pipeline_folder

__all__ = [
    "FromOfficialCheckpointMixin",
    "convert_state_dict",
    "infer_config",
    "load_official_state_dict",
    "official_pipeline_folder",
    "official_state_dict_for_model",
    "resolve_checkpoint_file",
    "sample_size_from_name",
    "select_denoiser",
]
