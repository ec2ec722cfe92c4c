# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The attention projections in diffusers' names, from the fused layout.

The official checkpoints (and folders saved by diffusers-pixnerd before 0.2) hold one fused `to_qkv` (q, k, v rows
stacked), one `add_kv_proj` (text k, v) and a bare `to_out` linear. The model now has diffusers' `to_q`, `to_k`,
`to_v`, `add_k_proj`, `add_v_proj` and `to_out.0`, so that diffusers' LoRA targets, attention processors and
`fuse_qkv_projections` apply. `unfuse_attention_keys` maps a state dict from the fused layout: weights (and a LoRA's
`lora_B`, the output side) are split by rows; a LoRA's `lora_A` (the input side) is shared by the split projections,
so the adapter's update `B @ A` is the same, split by rows. Keys already in the new layout pass through.
"""

import re

import torch

# `attn.<fused>.<rest>` -> the names it splits into, in row order.
_FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "add_kv_proj": ("add_k_proj", "add_v_proj")}
_FUSED_KEY = re.compile(r"^(?P<prefix>.*\battn\.)(?P<fused>to_qkv|add_kv_proj)\.(?P<rest>.+)$")
_BARE_OUT_KEY = re.compile(r"^(?P<prefix>.*\battn\.)to_out\.(?P<rest>(?!\d+\.).+)$")


def _splits_by_rows(rest: str) -> bool:
    """Whether the tensor under `rest` has the fused output rows (base weights, `lora_B`, DoRA magnitudes);
    `lora_A` (and other input-side tensors) is shared."""
    return "lora_A" not in rest and "lora_embedding_A" not in rest


def unfuse_attention_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with fused attention keys (`to_qkv`, `add_kv_proj`, bare `to_out`) in diffusers' layout.
    Works on model, PEFT and diffusers-LoRA state dicts (any key prefix, any adapter name)."""
    converted = {}
    for key, value in state_dict.items():
        fused = _FUSED_KEY.match(key)
        bare_out = _BARE_OUT_KEY.match(key)
        if fused is not None:
            names = _FUSED[fused["fused"]]
            rest = fused["rest"]
            if _splits_by_rows(rest):
                if value.shape[0] % len(names):
                    raise ValueError(f"`{key}` has {value.shape[0]} rows, not a multiple of {len(names)}.")
                parts = value.chunk(len(names), dim=0)
            else:
                parts = [value] * len(names)
            for name, part in zip(names, parts):
                converted[f"{fused['prefix']}{name}.{rest}"] = part.clone()
        elif bare_out is not None:
            converted[f"{bare_out['prefix']}to_out.0.{bare_out['rest']}"] = value
        else:
            converted[key] = value
    return converted


def has_fused_attention_keys(state_dict) -> bool:
    """Whether any key of `state_dict` (a dict or a list of keys) is in the fused layout."""
    return any(_FUSED_KEY.match(key) or _BARE_OUT_KEY.match(key) for key in state_dict)


def unfuse_target_modules(names):
    """LoRA target module names of the fused layout in diffusers' layout (`to_qkv` -> `to_q`, `to_k`, `to_v`;
    `add_kv_proj` -> `add_k_proj`, `add_v_proj`; `to_out` -> `to_out.0`); others pass through, order kept."""
    if isinstance(names, str):  # a PEFT regex: rewrite the names inside it
        for fused, split in _FUSED.items():
            names = names.replace(fused, f"({'|'.join(split)})")
        return re.sub(r"to_out(?!\.\d)", "to_out.0", names)
    unfused = []
    for name in names:
        head, _, last = name.rpartition(".")
        split = _FUSED.get(last)
        if split is not None:
            unfused += [f"{head}.{part}" if head else part for part in split]
        elif last == "to_out":
            unfused.append(f"{name}.0")
        else:
            unfused.append(name)
    return unfused
