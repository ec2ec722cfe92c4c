# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""What a training run is built from: the `Accelerator` (processes, logging), the seed, the output folder (lock, resume
or overwrite), the REPA encoder and projector, the weight dtype."""

import argparse
import importlib.util
import logging
import os

import torch
import torch.nn as nn

from .checkpoints import (
    EXPORT_MARKERS,
    check_output_dir,
    lock_output_dir,
    read_training_state,
    remove_temporary_checkpoints,
    resolve_checkpoint,
)
from .objectives import (
    REPAProjector,
    load_repa_encoder,
)

logger = logging.getLogger(__name__)


def create_accelerator(args: argparse.Namespace):
    """The `Accelerator` (project folders, seedable data order, trackers) and the logging set-up.

    Without a GPU it runs on the CPU (several processes then use gloo DDP); a launcher asking for more processes than
    the run really has (e.g. `--multi_gpu` on a machine Accelerate cannot use that way) is an error, not silent copies.
    """
    import datasets
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        cpu=args.cpu or not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )
    # INFO from the main process only; warnings (e.g. skipped images) from all.
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=level)
    for library in (datasets, transformers, diffusers):
        library.utils.logging.set_verbosity(logging.WARNING if accelerator.is_local_main_process else logging.ERROR)
    launched = int(os.environ.get("WORLD_SIZE", accelerator.num_processes))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"The launcher started {launched} processes but Accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type}): each would train alone. Accelerate cannot use this launch "
            "configuration here (FSDP and DeepSpeed need GPUs; on CPUs use plain `--multi_gpu`)."
        )
    logger.info(
        "Processes: %d (%s), device %s", accelerator.num_processes, accelerator.distributed_type, accelerator.device
    )
    for engine in ("FSDP", "DEEPSPEED"):
        requested = os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"
        if requested and accelerator.distributed_type.value != engine and accelerator.is_main_process:
            logger.warning(
                "The launcher asked for %s, which Accelerate only runs on GPUs: training with %s instead.",
                engine,
                accelerator.distributed_type.value,
            )
    if accelerator.distributed_type.value == "FSDP" and args.use_ema and args.ema_device == "cpu":
        raise ValueError("`--ema_device cpu` is not supported with FSDP (the EMA is sharded like the weights).")
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed cannot read it from a dataloader prepared alone
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def resolve_seed(accelerator, seed: int | None, checkpoint: str | None) -> int:
    """The one seed of the run: `seed` (`--seed`) when given, else the one stored in the `checkpoint` being resumed
    (so that a resumed run draws what the uninterrupted one would have), else one drawn once and shared by all
    processes. Every process must call it."""
    from accelerate.utils import broadcast_object_list

    if seed is None and checkpoint is not None:
        seed = read_training_state(checkpoint)["seed"]
    if seed is None:
        drawn = [int.from_bytes(os.urandom(4), "little")]
        if accelerator.num_processes > 1:
            broadcast_object_list(drawn)  # the main process's
        seed = drawn[0]
    return seed


def prepare_output_dir(accelerator, args: argparse.Namespace) -> str | None:
    """Locks the folder, repairs interrupted saves, checks for an earlier run; returns the checkpoint to resume from
    (`None`: a new run). With `--overwrite_output_dir` the earlier checkpoints stay: `TrainingRun` deletes them once
    it has committed its first checkpoint, so a run that fails to start loses nothing."""
    if accelerator.is_main_process:
        lock_output_dir(args.output_dir)
        remove_temporary_checkpoints(args.output_dir)
    accelerator.wait_for_everyone()
    check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.resume_from_checkpoint is not None and checkpoint is None:
        exported = [m for m in EXPORT_MARKERS if os.path.exists(os.path.join(args.output_dir, m))]
        if exported:
            raise ValueError(
                f"`--resume_from_checkpoint {args.resume_from_checkpoint}`: {args.output_dir!r} holds an exported "
                f"model ({exported[0]}) but no checkpoint to continue from, so its training state is gone. Pass "
                "`--overwrite_output_dir` to train again from the start, or train on from the exported model with "
                "`--pretrained_model_name_or_path` and another `--output_dir`."
            )
    if args.resume_from_checkpoint is not None and checkpoint is None:
        logger.info("No checkpoint in %s: starting a new run.", args.output_dir)
    accelerator.wait_for_everyone()
    return checkpoint


def create_repa_encoder(accelerator, args: argparse.Namespace) -> nn.Module | None:
    """The frozen DINOv2 of REPA (on the device, in the mixed-precision dtype), or `None` without REPA. Loaded first
    thing in a run, so that a missing encoder stops it before the data and the model load."""
    if not args.use_repa:
        return None
    try:
        encoder = load_repa_encoder(args.repa_encoder, cache_dir=args.cache_dir)
    except OSError as error:
        raise ValueError(
            f"REPA needs the DINOv2 encoder `--repa_encoder` {args.repa_encoder!r}, which could not be loaded "
            f"({str(error).splitlines()[0]}). Give a local DINOv2 folder (or run once with Hub access to cache it), "
            "or train without REPA: `--no_use_repa`."
        ) from None
    return encoder.to(accelerator.device, dtype=weight_dtype(accelerator))


def create_repa_projector(args: argparse.Namespace, transformer, encoder: nn.Module | None) -> nn.Module | None:
    """A fresh REPA projector from the transformer's width to the encoder's (trained, not exported)."""
    if encoder is None:
        return None
    hidden_size = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    return REPAProjector(hidden_size, encoder.config.hidden_size, args.repa_projector_dim)


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen modules under Accelerate's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def quantize_text_encoder(text_encoder: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """An int8 weight-only copy (torchao) of a frozen text encoder, computing in `dtype`; the original is left as it
    is (on the CPU), to be exported unchanged."""
    import copy

    if importlib.util.find_spec("torchao") is None:
        raise ImportError('`--quantize_text_encoder` needs torchao: `pip install "diffusers-pixnerd[optimizers]"`.')
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantized = copy.deepcopy(text_encoder).to(dtype=dtype)
    quantize_(quantized, Int8WeightOnlyConfig())
    return quantized.requires_grad_(False).eval()
