# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The EMA of the trained weights: diffusers' `EMAModel` with the official constant decay or diffusers' warm-up, the
decay chosen from the run length, and swapping the EMA weights in for validation and export."""

import json
import logging
import os
from contextlib import contextmanager
from typing import Iterable

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file

EMA_FILE = "ema.safetensors"


def create_ema(
    parameters: Iterable[torch.nn.Parameter],
    decay: float = 0.9999,
    warmup: bool = False,
    update_interval: int = 1,
    device: torch.device | str | None = None,
) -> EMAModel:
    """diffusers' `EMAModel` in float32, with the official constant decay (`simple_ema.py`) or diffusers' warm-up.

    `decay` is per optimizer step: updated every `update_interval` steps, the EMA uses `decay ** update_interval`,
    which averages over the same number of steps. `device` keeps the EMA there (e.g. "cpu", off the accelerator);
    default: where the parameters are. Update it with `update_ema`.

    By default `min_decay = decay` and `update_after_step = -1` turn off diffusers' `(1 + n) / (10 + n)` warm-up, so
    that every update is `ema = decay ema + (1 - decay) param` from the first step on, as in the official runs (which
    are millions of steps long). A short run from scratch should pass `warmup=True`: the decay then follows
    `min(decay, (1 + n) / (10 + n))`, and the random initial weights do not linger in the average (with the constant
    decay they still weigh `decay ** steps` at the end: 9% after 2,400 steps at 0.999).
    """
    decay = decay**update_interval
    parameters = list(parameters)
    if device is not None:
        parameters = [_staged(p, device) for p in parameters]
    if warmup:
        ema = EMAModel(parameters, decay=decay, min_decay=0.0, update_after_step=0, foreach=False)
    else:
        ema = EMAModel(parameters, decay=decay, min_decay=decay, update_after_step=-1, foreach=False)
    ema.to(dtype=torch.float32)
    return ema


def _staged(parameter: torch.Tensor, device: torch.device | str) -> torch.nn.Parameter:
    """A float32 copy of a trained parameter on `device`, marked trainable: `EMAModel.step` averages only parameters
    that require grad (it copies the others)."""
    return torch.nn.Parameter(parameter.detach().to(device, torch.float32), requires_grad=parameter.requires_grad)


def update_ema(ema: EMAModel, parameters: list[torch.nn.Parameter]):
    """One EMA update from the trained `parameters`, also when the EMA lives on another device (the CPU): the weights
    are then copied there first (a float32 copy in host memory, not on the accelerator)."""
    device = ema.shadow_params[0].device if ema.shadow_params else None
    if device is not None and parameters and parameters[0].device != device:
        parameters = [_staged(p, device) for p in parameters]
    ema.step(parameters)


logger = logging.getLogger(__name__)

EMA_MAX_INITIAL_SHARE = 0.01  # the largest share of the starting weights in the exported EMA that is not warned about


def ema_decay_for_run(max_train_steps: int, official_decay: float = 0.9999) -> float:
    """The EMA decay of a run whose `--ema_decay` is not given: the official 0.9999 where the run is long enough for it
    (the starting weights weigh `decay ** steps` at the end, under 1% after 46,000 steps), else `1 - 10 / steps`, an
    average over about the last tenth of the run in which the starting weights weigh `exp(-10)`, 5e-5 (0 for runs of
    up to 10 steps: the raw weights)."""
    return min(official_decay, max(0.0, 1.0 - 10.0 / max_train_steps))


def training_ema(
    parameters: list[torch.nn.Parameter],
    max_train_steps: int,
    decay: float | None = None,
    warmup: bool = False,
    update_interval: int = 1,
    device: torch.device | str | None = None,
    resuming: bool = False,
) -> tuple[EMAModel, float]:
    """The EMA of a training run's trained `parameters` (`create_ema`) and its decay per step: `decay`, or chosen from
    the run length when `None` (`ema_decay_for_run`, logged). A fresh run (not `resuming`) whose constant decay leaves
    the starting weights more than `EMA_MAX_INITIAL_SHARE` of the export is warned about."""
    if decay is None:
        decay = ema_decay_for_run(max_train_steps)
        logger.info(
            "EMA decay %.6g, chosen from the run length (%d steps): the export averages about the last %d steps.",
            decay,
            max_train_steps,
            round(1 / max(1 - decay, 1e-12)),
        )
    initial_share = 0.0 if warmup else decay**max_train_steps
    if not resuming and initial_share > EMA_MAX_INITIAL_SHARE:
        logger.warning(
            "With the constant EMA decay %g, the starting weights (the base model when fine-tuning, the random "
            "initialisation from scratch) still make up %.0f%% of the exported EMA after %d steps, so the export "
            "stays close to them. Leave `--ema_decay` unset to choose it from the run length, or pass "
            "`--ema_warmup` or `--no_use_ema`.",
            decay,
            100 * initial_share,
            max_train_steps,
        )
    return create_ema(parameters, decay, warmup, update_interval, device), decay


def restart_ema(ema: EMAModel, parameters: list[torch.nn.Parameter]):
    """Starts `ema` again from the current values of `parameters` (its settings kept)."""
    with torch.no_grad():
        for shadow, parameter in zip(ema.shadow_params, parameters):
            shadow.copy_(parameter.detach().to(shadow.device, torch.float32))
    ema.optimization_step = 0


def save_ema(ema: EMAModel, path: str):
    """The EMA as safetensors: `shadow_params.<i>` tensors, the other `EMAModel.state_dict()` entries (decay, step,
    ...) as JSON metadata. No pickle, so a checkpoint folder from elsewhere cannot run code when resumed."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    tensors = {f"shadow_params.{i}": local_tensor(p).detach().to("cpu").contiguous() for i, p in enumerate(shadow)}
    save_file(tensors, path, metadata={"ema_state": json.dumps(state)})


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of an FSDP2 `DTensor`, else the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def shard_like(ema: EMAModel, parameters: list[torch.nn.Parameter], path: str):
    """After `ema.load_state_dict` from this process's EMA file `path`: each shadow tensor (a local shard, as
    `save_ema` wrote it) becomes a `DTensor` sharded like its FSDP2 parameter, on its device; plain parameters only
    move to their device. A shard of another shape (the checkpoint was written by another number of processes) is
    an error naming the file."""
    from torch.distributed.tensor import DTensor

    if len(ema.shadow_params) != len(parameters):
        raise ValueError(f"{path} holds {len(ema.shadow_params)} EMA tensors, the trained model {len(parameters)}.")
    shadow = []
    for i, (tensor, param) in enumerate(zip(ema.shadow_params, parameters)):
        local = local_tensor(param)
        if tensor.shape != local.shape:
            raise ValueError(
                f"{path}: EMA tensor {i} has the shape {tuple(tensor.shape)}, this process's part of the parameter "
                f"{tuple(local.shape)}: the checkpoint was written by another number of processes or another model."
            )
        tensor = tensor.to(local.device, dtype=torch.float32)
        if isinstance(param, DTensor):
            tensor = DTensor.from_local(
                tensor, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
            )
        shadow.append(tensor)
    ema.shadow_params = shadow


def load_ema_state(path: str) -> dict:
    """An `EMAModel.state_dict()` from `save_ema`'s file."""
    try:
        with safe_open(path, framework="pt") as f:
            state = json.loads((f.metadata() or {})["ema_state"])
            state["shadow_params"] = [f.get_tensor(f"shadow_params.{i}") for i in range(len(list(f.keys())))]
    except Exception as e:  # noqa: BLE001 - safetensors' and json's errors do not name the file
        raise ValueError(
            f"{path!r} is not an EMA file written by diffusers-pixnerd ({type(e).__name__}: {e})."
        ) from None
    return state


def ema_file_in(checkpoint: str, name: str = EMA_FILE) -> str | None:
    """The EMA file `name` of `checkpoint`, or `None` if it has none."""
    path = os.path.join(checkpoint, name)
    return path if os.path.isfile(path) else None


@contextmanager
def ema_weights(ema: EMAModel | None, parameters: list[torch.nn.Parameter]):
    """Swaps the EMA weights into `parameters` for the block (validation, export), then puts the trained ones back."""
    if ema is None:
        yield
        return
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)
