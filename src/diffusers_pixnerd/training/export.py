# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""What a run exports: its weights gathered whole onto the main process (FSDP shards included), and fresh modules
that hold them (no projector, no PEFT or FSDP wrappers). `TrainingRun` swaps the EMA weights in around the gathering."""

import torch
import torch.nn as nn

from ..utils import sub_state_dict


def gathered_state(accelerator, model: nn.Module) -> dict[str, torch.Tensor]:
    """The full state of the prepared `model`, copied to the CPU of the main process (empty on the others). Every
    process must call it: FSDP gathers the shards."""
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return {}
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def gathered_trained_parameters(accelerator, module: nn.Module) -> dict[str, torch.Tensor]:
    """The trained parameters of `module` by name, whole and copied to the CPU of the main process (empty on the
    others): only what trains, not a frozen base. Every process must call it: FSDP gathers each parameter from its
    shards."""
    from torch.distributed.tensor import DTensor

    state = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            whole = param.full_tensor() if isinstance(param, DTensor) else param
            if accelerator.is_main_process:
                state[name] = whole.detach().to("cpu", copy=True)
    return state


def exported_transformer(transformer: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh transformer of the class and config of `transformer` holding the `transformer.*` weights of `state` (the
    training module's): no projector, no PEFT wrappers."""
    copy = type(transformer).from_config(transformer.config)
    copy.load_state_dict(sub_state_dict(state, "transformer"))
    return copy


def exported_module(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new module of the class and config of `module` (a Transformers or Diffusers model) holding `state`, all its
    weights. `module` itself cannot take them when its parameters are FSDP shards; the copy's are allocated empty,
    then assigned the state's tensors (its buffers are built as usual)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        copy = type(module)(module.config)
    copy.load_state_dict(state, assign=True)
    return copy
