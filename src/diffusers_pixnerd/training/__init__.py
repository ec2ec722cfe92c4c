# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""What the PixNerd training scripts share, one module per concern (each imports only the ones listed before it):

- `objectives`: timestep (sigma) sampling, the rectified-flow loss, condition dropout, flips, REPA (projector,
  DINOv2 targets, cosine loss), prompt encoding, and `PixNerdTrainingModule` (the losses of a step).
- `ema`: the EMA of the trained weights (`create_ema`, `update_ema`, `ema_decay_for_run`, `ema_weights`), on the
  accelerator or the CPU.
- `optimizers`: `--optimizer` (AdamW, 8-bit and 4-bit AdamW, AdamW on bfloat16 weights, Adafactor, Prodigy) and the
  lr schedule.
- `checkpoints`: checkpoints that survive a kill (write, commit, list, resolve, check, clean up), the `--output_dir`
  lock, LoRA checkpoints (the adapters, not the base), and loading a checkpoint's weights (`load_checkpoint_weights`).
- `buckets`: aspect-ratio buckets (sizes, assignment, image sizes from the headers, the per-bucket batch order).
- `images`: one image: decoding to RGB and `--image_preprocessing` (the official crops, padding).
- `data`: image folders and `datasets` datasets, lazy decoding, the data loader of a run.
- `prompt_cache`: `--precompute_text_embeddings`: distinct captions encoded once, sharded across processes, looked up
  in the step.
- `validation`: the validation images (at step 0, every `--validation_steps`, at the end; `--validation_sizes`,
  prompt files), shared across processes, saved and logged.
- `prior`: regularisation images (prior preservation): `--reg_data_dir` or base-model images for `--reg_prompts_file`,
  mixed into every micro-batch in an order fixed by (seed, process, micro-batch), their own loss weight (T2I).
- `distill`: few-step distillation (`--distill`): teacher samples of the base model (shared across processes,
  resumable), the student's sampler and sigmas, `few_step_sampler.json`.
- `cli`: the flags both scripts share and their checks, the model config from the flags.
- `hub`: the model card's training section and the upload to the Hub.
- `run_setup`: what a run is built from: the `Accelerator`, the seed, the output folder, REPA, LoRA adapters.
- `signals`: SIGINT / SIGTERM stop a run after the current step, with a checkpoint (`StopSignals`).
- `export`: the weights gathered onto the main process (FSDP shards included), fresh modules holding them.
- `loop`: `TrainingRun` (batches, step, backward, EMA, logs, checkpoints and resume, signals, validation, export).

The names the example scripts use are importable from here: `from diffusers_pixnerd.training import TrainingRun`.
"""

from ..utils import sub_state_dict
from .checkpoints import (
    check_output_dir,
    commit_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
    remove_temporary_checkpoints,
    resolve_checkpoint,
)
from .cli import (
    TrainingHelpFormatter,
    add_training_arguments,
    check_resolution,
    check_training_arguments,
    model_config_from_args,
    tracker_config,
)
from .data import (
    ImageSampleDataset,
    StreamingImageSampleDataset,
    collate_samples,
    count_classes,
    create_dataloader,
    dataloader_workers,
    load_training_dataset,
    read_class_names,
    scan_caption_folder,
    scan_class_folder,
    training_steps,
)
from .ema import create_ema, ema_decay_for_run, ema_weights, training_ema, update_ema
from .export import exported_module
from .hub import (
    HubAccessError,
    check_hub_access,
    hub_model_id,
    lora_model_card,
    model_card_training_section,
    push_folder,
    upload_output_dir,
)
from .images import adm_center_crop, image_to_tensor, open_image, pad_to_size, resize_center_crop
from .loop import TrainingRun
from .lora import adapters_disabled, add_lora_adapters, save_lora_adapters
from .objectives import (
    PixNerdTrainingModule,
    REPAProjector,
    StepSampling,
    capture_block_output,
    condition_drop_mask,
    encode_prompts,
    flow_matching_loss,
    random_flip,
    repa_target_features,
    sample_sigmas,
    shift_sigmas,
)
from .optimizers import (
    OPTIMIZERS,
    create_optimizer,
    create_optimizer_and_schedule,
    parameter_groups,
    trained_weights_dtype,
)
from .prompt_cache import PromptEmbeddingCache, prompt_cache_folder, stream_captions
from .run_setup import (
    create_accelerator,
    create_repa_encoder,
    create_repa_projector,
    prepare_output_dir,
    quantize_text_encoder,
    resolve_seed,
    weight_dtype,
)
from .validation import ValidationSettings, check_validation_sizes, read_prompts_file, validation_prompts

__all__ = [
    "HubAccessError",
    "PromptEmbeddingCache",
    "prompt_cache_folder",
    "stream_captions",
    "OPTIMIZERS",
    "add_lora_adapters",
    "adapters_disabled",
    "create_optimizer",
    "create_optimizer_and_schedule",
    "trained_weights_dtype",
    "update_ema",
    "ImageSampleDataset",
    "PixNerdTrainingModule",
    "REPAProjector",
    "StreamingImageSampleDataset",
    "TrainingHelpFormatter",
    "StepSampling",
    "TrainingRun",
    "ValidationSettings",
    "model_card_training_section",
    "parameter_groups",
    "tracker_config",
    "training_ema",
    "training_steps",
    "exported_module",
    "add_training_arguments",
    "adm_center_crop",
    "capture_block_output",
    "check_hub_access",
    "check_output_dir",
    "check_resolution",
    "check_training_arguments",
    "collate_samples",
    "commit_checkpoint",
    "condition_drop_mask",
    "count_classes",
    "create_accelerator",
    "create_dataloader",
    "create_ema",
    "create_repa_encoder",
    "create_repa_projector",
    "dataloader_workers",
    "ema_decay_for_run",
    "ema_weights",
    "encode_prompts",
    "flow_matching_loss",
    "hub_model_id",
    "lora_model_card",
    "image_to_tensor",
    "list_checkpoints",
    "load_checkpoint_weights",
    "load_training_dataset",
    "model_config_from_args",
    "open_image",
    "pad_to_size",
    "prepare_output_dir",
    "quantize_text_encoder",
    "push_folder",
    "upload_output_dir",
    "random_flip",
    "read_class_names",
    "remove_temporary_checkpoints",
    "repa_target_features",
    "resize_center_crop",
    "resolve_checkpoint",
    "resolve_seed",
    "sample_sigmas",
    "save_lora_adapters",
    "scan_caption_folder",
    "scan_class_folder",
    "shift_sigmas",
    "sub_state_dict",
    "weight_dtype",
    "check_validation_sizes",
    "read_prompts_file",
    "validation_prompts",
]
