# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Checkpoints that survive a kill: `checkpoint-N` folders written as `checkpoint-N.tmp` and committed by a rename,
listed, resolved for `--resume_from_checkpoint`, checked, cleaned up after an interrupted save; the lock on
`--output_dir`; and loading the transformer weights (EMA or trained) of a checkpoint (a LoRA run's: `lora.py`)."""

import errno
import json
import logging
import os
import re
import shlex
import shutil
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch.nn as nn

from ..utils import normal_permissions, sub_state_dict
from .ema import ema_file_in, load_ema_state
from .lora import LORA_WEIGHTS_FILE, load_lora_checkpoint_weights

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
TRAINING_STATE_FILE = "training_state.json"
MODEL_FILE = "model.safetensors"  # Accelerate's file of the whole training module (full fine-tuning)
EXPORT_MARKERS = ("model_index.json", LORA_WEIGHTS_FILE)  # the files of a finished run's export


@contextmanager
def quiet_loggers(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """The loggers `names` report only from `level` inside the block (Accelerate's `save_state` logs the temporary
    folder and a sampler file it does not always write; the run logs what the committed checkpoint holds instead)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(max(level, log.getEffectiveLevel()))
    try:
        yield
    finally:
        for log, old in zip(loggers, levels):
            log.setLevel(old)


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints `(step, path)` in `output_dir`, oldest first: `checkpoint-N` folders holding their
    training state file (written last); temporary (`.tmp`) and replaced (`.old`) folders do not count."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        step = name[len(CHECKPOINT_PREFIX) :]
        path = os.path.join(output_dir, name)
        if (
            name.startswith(CHECKPOINT_PREFIX)
            and step.isdigit()
            and os.path.isfile(os.path.join(path, TRAINING_STATE_FILE))
        ):
            found.append((int(step), path))
    return sorted(found)


def resolve_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The folder of `--resume_from_checkpoint`: "latest" (the highest complete one, `None` if there is none), a
    checkpoint name in `output_dir` or a path."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1][1] if checkpoints else None
    path = resume_from_checkpoint
    if not os.path.isdir(path):
        path = os.path.join(output_dir, resume_from_checkpoint)
    if not os.path.isdir(path) or path.endswith(TMP_SUFFIX):
        raise ValueError(f"`--resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint folder.")
    return path


TRAINING_STATE_KEYS = ("global_step", "num_processes", "train_batch_size", "gradient_accumulation_steps")


def read_training_state(checkpoint: str) -> dict:
    """`training_state.json` of a checkpoint; a file that is not what `TrainingRun.save` writes is named."""
    path = os.path.join(checkpoint, TRAINING_STATE_FILE)
    with open(path, encoding="utf-8") as f:
        try:
            state = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}): the checkpoint is damaged.") from None
    if not isinstance(state, dict):
        raise ValueError(
            f"{path} must hold a JSON object with {list(TRAINING_STATE_KEYS)}; the checkpoint is damaged."
        )
    for key in TRAINING_STATE_KEYS:
        if not (isinstance(state.get(key), int) and not isinstance(state[key], bool) and state[key] >= 0):
            raise ValueError(
                f"{path}: `{key}` must be a non-negative integer, got {state.get(key)!r}; the checkpoint is damaged."
            )
    return state


def fsync_tree(folder: str):
    """Flushes every file under `folder`, then the folders themselves, to the disk (before a rename commits them)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(folder: str):
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def commit_checkpoint(temporary: str, total_limit: int | None = None, stale: Iterable[str] = ()) -> str:
    """Commits a fully written `checkpoint-N.tmp` as `checkpoint-N`: its files are flushed to the disk, then it is
    renamed (atomic on one file system). An existing `checkpoint-N` (the same step saved again by a resumed run) is
    first moved aside to `checkpoint-N.old` and deleted only after the rename, so a kill at any point leaves a
    complete `checkpoint-N`, old or new (`remove_temporary_checkpoints` puts an `.old` back). Then deletes the `stale`
    checkpoints (of a run being overwritten) and the oldest ones beyond `total_limit`. Until the rename, "latest" is
    the previous checkpoint."""
    output_dir, name = os.path.split(temporary.rstrip(os.sep))
    final = os.path.join(output_dir, name[: -len(TMP_SUFFIX)])
    normal_permissions(temporary)  # safetensors' files come out private (0600)
    fsync_tree(temporary)
    replaced = final + OLD_SUFFIX
    if os.path.exists(final):
        if os.path.exists(replaced):
            shutil.rmtree(replaced)
        os.rename(final, replaced)
    os.rename(temporary, final)
    fsync_dir(output_dir)
    if os.path.exists(replaced):
        shutil.rmtree(replaced)
    for path in stale:
        if os.path.abspath(path) != os.path.abspath(final) and os.path.isdir(path):
            logger.info("Removing %s (an earlier run, `--overwrite_output_dir`)", path)
            shutil.rmtree(path)
    if total_limit is not None:
        checkpoints = list_checkpoints(output_dir)
        for _, old in checkpoints[: max(0, len(checkpoints) - total_limit)]:
            logger.info("Removing %s (checkpoints_total_limit=%d)", old, total_limit)
            shutil.rmtree(old)
    return final


def folder_size(folder: str) -> int:
    """Bytes in the files under `folder` (0 if it does not exist)."""
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def free_space(folder: str) -> int:
    """Bytes free on the disk that holds `folder`."""
    return shutil.disk_usage(folder).free


def disk_full_error(error: Exception, temporary: str, output_dir: str) -> OSError | None:
    """The error to raise when writing the checkpoint `temporary` failed for want of disk space, else `None`. A full
    disk shows as `ENOSPC` / "No space left", or, from torch's writer, as a `RuntimeError` ("unexpected pos ...")
    that only the free space tells apart: less free than the last complete checkpoint took counts as full. The message
    names the folder, the free space and the space a checkpoint needs, and the intact earlier checkpoint."""
    latest = list_checkpoints(output_dir)
    needed = folder_size(latest[-1][1]) if latest else folder_size(temporary)
    free = free_space(output_dir)
    full = getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)
    if not full and not (isinstance(error, RuntimeError) and "unexpected pos" in str(error) and free < needed):
        return None
    final = temporary[: -len(TMP_SUFFIX)]
    return OSError(
        errno.ENOSPC,
        f"The disk is full: could not write {final} ({str(error).splitlines()[0].strip()}). The disk holding "
        f"{os.path.abspath(output_dir)} has {free / 2**20:.1f} MiB free; a checkpoint of this run takes about "
        f"{needed / 2**20:.1f} MiB. The last complete checkpoint, {latest[-1][1] if latest else 'none yet'}, is "
        "intact: free some space and resume with `--resume_from_checkpoint latest`.",
    )


def check_checkpoint_files(checkpoint: str, lora: bool):
    """Before a resume: every safetensors file of `checkpoint` has a readable header that covers the whole file (a
    truncated copy or an interrupted write fails here, named), and the checkpoint is of this run's kind (full weights
    or LoRA adapters)."""
    from safetensors import safe_open

    for name in sorted(os.listdir(checkpoint)):
        if not name.endswith(".safetensors"):
            continue
        try:
            with safe_open(os.path.join(checkpoint, name), framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 - SafetensorError names neither the file nor what to do
            raise ValueError(
                f"{os.path.join(checkpoint, name)} is damaged ({error}): this checkpoint cannot be resumed. "
                f"{earlier_checkpoints_hint(checkpoint)}"
            ) from None
    has_model = os.path.isfile(os.path.join(checkpoint, MODEL_FILE))
    has_lora = os.path.isfile(os.path.join(checkpoint, LORA_WEIGHTS_FILE))
    if lora and not has_lora:
        raise ValueError(
            f"{checkpoint} holds no {LORA_WEIGHTS_FILE}: it was not written by a LoRA run. Resume it without "
            "`--use_lora`, or train LoRA adapters from its exported pipeline in a new `--output_dir`."
        )
    if not lora and has_lora and not has_model:
        raise ValueError(f"{checkpoint} holds the adapters of a LoRA run: resume it with `--use_lora`.")


def earlier_checkpoints_hint(checkpoint: str) -> str:
    """What to do instead of resuming a damaged `checkpoint`: the complete checkpoints before it, by name."""
    output_dir, name = os.path.split(os.path.abspath(checkpoint))
    step = name[len(CHECKPOINT_PREFIX) :]
    earlier = [
        os.path.basename(path)
        for number, path in list_checkpoints(output_dir)
        if not step.isdigit() or number < int(step)
    ]
    if not earlier:
        return (
            f"There is no earlier checkpoint in {output_dir}: put back an intact copy of the file, or start over with "
            "`--overwrite_output_dir`."
        )
    return (
        f"Resume from an earlier checkpoint by name, e.g. `--resume_from_checkpoint {earlier[-1]}` (complete ones in "
        f"{output_dir}: {', '.join(earlier)}); `latest` would pick this one again."
    )


def is_lora_checkpoint(checkpoint: str) -> bool:
    """Whether `checkpoint` is a LoRA run's (adapters, no full weights)."""
    return os.path.isfile(os.path.join(checkpoint, LORA_WEIGHTS_FILE)) and not os.path.isfile(
        os.path.join(checkpoint, MODEL_FILE)
    )


def load_checkpoint_weights(
    transformer: nn.Module, checkpoint: str, use_ema: bool = True, text_encoder: nn.Module | None = None
) -> str:
    """Puts the transformer weights of a full-training checkpoint folder into `transformer` (same config): its EMA
    when the run kept one and `use_ema`, else the trained weights. Returns which ("ema" or "trained"). A LoRA run's
    checkpoint adds its adapters to `transformer`, the base model (`load_lora_checkpoint_weights`).

    A run that also trained the last Qwen3 layers (`--train_text_encoder_layers`) holds the text encoder too: it goes
    into `text_encoder`, which must then be given (evaluating such a checkpoint with the base encoder would measure
    another model), with its trained weights: the EMA covers the transformer only, as in the run's export."""
    from safetensors.torch import load_file

    if is_lora_checkpoint(checkpoint):
        return load_lora_checkpoint_weights(transformer, checkpoint, use_ema)
    model_file = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(model_file):
        raise ValueError(f"{checkpoint!r} is not a training checkpoint folder (no model.safetensors).")
    state = load_file(model_file)
    weights = sub_state_dict(state, "transformer")
    encoder_weights = sub_state_dict(state, "text_encoder")
    if encoder_weights and text_encoder is None:
        raise ValueError(
            f"{checkpoint!r} also trained the text encoder (`--train_text_encoder_layers`): pass `text_encoder` to "
            "load it too."
        )
    transformer.load_state_dict(weights)
    if encoder_weights:
        text_encoder.load_state_dict(encoder_weights)
    ema_file = ema_file_in(checkpoint)
    if not (use_ema and ema_file):
        return "trained"
    shadow = load_ema_state(ema_file)["shadow_params"]  # in the order of the parameters when it was saved
    names = [n for n, _ in transformer.named_parameters()]
    if len(shadow) != len(names):
        raise ValueError(f"{ema_file} holds {len(shadow)} tensors, the transformer {len(names)} parameters.")
    ema_weights = dict(zip(names, shadow))
    transformer.load_state_dict(ema_weights)
    return "ema"


def remove_temporary_checkpoints(output_dir: str):
    """Cleans up after a run killed while saving: a `checkpoint-N.old` whose replacement never arrived becomes
    `checkpoint-N` again (it is complete), one that was replaced is deleted; `checkpoint-N.tmp` folders (incomplete,
    or complete but not committed) are deleted."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if not name.startswith(CHECKPOINT_PREFIX) or not name.endswith(OLD_SUFFIX):
            continue
        final = path[: -len(OLD_SUFFIX)]
        if os.path.isfile(os.path.join(final, TRAINING_STATE_FILE)):
            shutil.rmtree(path)
        else:
            logger.warning("Restoring %s (a save replacing it was interrupted).", os.path.basename(final))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(path, final)
    for name in os.listdir(output_dir):
        if name.startswith(CHECKPOINT_PREFIX) and name.endswith(TMP_SUFFIX):
            logger.warning("Removing the incomplete checkpoint %s (a save was interrupted).", name)
            shutil.rmtree(os.path.join(output_dir, name))


def check_output_dir(output_dir: str, resume_from_checkpoint: str | None, overwrite_output_dir: bool):
    """Refuses to start a new run over an earlier one unless told to resume or overwrite."""
    earlier = [name for _, name in list_checkpoints(output_dir)]
    for marker in EXPORT_MARKERS:
        if os.path.exists(os.path.join(output_dir, marker)):
            earlier.append(os.path.join(output_dir, marker))
    if earlier and resume_from_checkpoint is None and not overwrite_output_dir:
        raise ValueError(
            f"`--output_dir` {output_dir!r} holds an earlier run ({earlier[-1]}). Pass `--resume_from_checkpoint "
            "latest` to continue it or `--overwrite_output_dir` to start over (its checkpoints are then deleted)."
        )


# Set by `accelerate launch` (any number of processes) and torchrun in the processes they start.
LAUNCHER_ENVIRONMENT = ("ACCELERATE_DYNAMO_BACKEND", "LOCAL_RANK")
NEGATIVE_NUMBER = re.compile(r"^-\.?\d")
NOT_REPEATED_ON_RESUME = ("--resume_from_checkpoint", "--overwrite_output_dir")


def launcher_command(script: str) -> tuple[list[str], dict]:
    """The command line before `script` that started this process, and the environment it was typed in: for a process
    that `accelerate launch` (or torchrun) started, the launcher's own (e.g. `python -m accelerate.commands.launch
    --multi_gpu --num_processes 2`, its flags included); else the running interpreter and this process's."""
    import psutil

    if any(name in os.environ for name in LAUNCHER_ENVIRONMENT):
        try:
            parent = psutil.Process(os.getppid())
            command = parent.cmdline()
            if script in command:
                return command[: command.index(script)], parent.environ()
        except psutil.Error:  # the launcher is gone or not readable: say which launcher, without its flags
            pass
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return ["accelerate", "launch"], os.environ
    return [sys.executable], os.environ


def group_options(args: list[str]) -> list[list[str]]:
    """Command-line arguments grouped per option: `--flag`, `--flag value ...` or `--flag=value` (a token such as
    `-0.5` is a value, as argparse reads it)."""
    groups = []
    for arg in args:
        if not groups or (arg.startswith("-") and not NEGATIVE_NUMBER.match(arg)):
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return groups


def resume_command(argv: list[str] | None = None) -> str:
    """The command that resumes this run: the same launcher (`launcher_command`: the running interpreter, or the
    `accelerate launch` command with its flags) with `OMP_NUM_THREADS` when it was set there, this script's flags
    given once each, then `--resume_from_checkpoint latest` (and no `--overwrite_output_dir`). A flag given twice keeps
    its last value at its last place, as argparse read it: a run continued by appending a higher `--max_train_steps`
    to the first command prints it once."""
    argv = list(sys.argv if argv is None else argv)
    launcher, environment = launcher_command(argv[0])
    groups = group_options(argv[1:])
    last = {group[0].split("=", 1)[0]: i for i, group in enumerate(groups)}
    kept = []
    for i, group in enumerate(groups):
        name = group[0].split("=", 1)[0]
        if last[name] == i and name not in NOT_REPEATED_ON_RESUME:
            kept += group
    threads = environment.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={shlex.quote(threads)} " if threads else ""
    return prefix + shlex.join([*launcher, argv[0], *kept, "--resume_from_checkpoint", "latest"])


_held_locks: dict[str, int] = {}


def lock_output_dir(output_dir: str):
    """Takes an exclusive lock on the folder `output_dir` itself (`flock` on the directory, released when this process
    exits; no file is left behind): a second run writing into the same folder stops with an error instead of mixing
    its checkpoints with the first one's."""
    import fcntl

    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _held_locks:  # this process already holds it (an earlier run in the same process)
        os.close(_held_locks.pop(key))
    descriptor = os.open(output_dir, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RuntimeError(
            f"Another training run is writing into `--output_dir` {output_dir!r}. Wait for it to end, or choose "
            "another `--output_dir`."
        ) from None
    _held_locks[key] = descriptor


def unlock_output_dir(output_dir: str):
    descriptor = _held_locks.pop(os.path.realpath(output_dir), None)
    if descriptor is not None:
        os.close(descriptor)
