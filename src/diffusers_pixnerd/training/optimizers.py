# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The optimizers of `--optimizer`, each from a maintained library, and the lr schedule.

| name | library | state per trained parameter | trained weights |
|---|---|---|---|
| `adamw` | torch | 8 bytes (two float32 moments) | float32 |
| `adamw8bit` | bitsandbytes `AdamW8bit` | ~2 bytes (blockwise 8-bit moments) | float32 |
| `adamw4bit` | torchao `AdamW4bit` | ~1 byte | float32 |
| `adamw_bf16` | torchao `_AdamW(bf16_stochastic_round=True)` | 4 bytes (bfloat16 moments) | bfloat16 |
| `adafactor` | transformers `Adafactor` (factored second moment, no first) | ~0 (row + column) | float32 |
| `prodigy` | prodigyopt `Prodigy` (learns the step size: use `--learning_rate 1.0`) | 16 bytes | float32 |

Only `adamw_bf16` keeps the trained weights in bfloat16: its stochastic rounding lets updates far below bfloat16's
resolution (lr 1e-5 on a weight of 0.02) survive on average, where round-to-nearest would drop them. The others
update float32 master weights (Accelerate's autocast computes in `--mixed_precision`).
"""

import argparse
import importlib.util

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit", "adamw_bf16", "adafactor", "prodigy")
# The pip package each optimizer needs (all in the `[training]` extra's companion `[optimizers]`).
OPTIMIZER_PACKAGES = {
    "adamw8bit": ("bitsandbytes", "bitsandbytes"),
    "adamw4bit": ("torchao", "torchao"),
    "adamw_bf16": ("torchao", "torchao"),
    "adafactor": ("transformers", "transformers"),
    "prodigy": ("prodigyopt", "prodigyopt"),
}


def trained_weights_dtype(optimizer: str) -> torch.dtype:
    """The dtype the trained weights are kept in with `optimizer` (bfloat16 only where stochastic rounding is safe)."""
    return torch.bfloat16 if optimizer == "adamw_bf16" else torch.float32


def check_optimizer_available(optimizer: str):
    """Fails early, before any model loads, if the library of `--optimizer` is missing."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`--optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}.")
    module, package = OPTIMIZER_PACKAGES.get(optimizer, ("torch", "torch"))
    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"`--optimizer {optimizer}` needs the `{package}` package: `pip install {package}` (or "
            '`pip install "diffusers-pixnerd[optimizers]"`).'
        )


def create_optimizer(args: argparse.Namespace, parameters: list, learning_rate: float) -> torch.optim.Optimizer:
    """The optimizer `--optimizer` over `parameters`; the Adam flags (`--adam_beta1/2`, `--adam_weight_decay`,
    `--adam_epsilon`) apply to every Adam variant and Prodigy, `--adam_weight_decay` also to Adafactor."""
    name = args.optimizer
    check_optimizer_available(name)
    adam = {
        "lr": learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "weight_decay": args.adam_weight_decay,
        "eps": args.adam_epsilon,
    }
    if name == "adamw":
        return torch.optim.AdamW(parameters, **adam)
    if name == "adamw8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, **adam)
    if name == "adamw4bit":
        from torchao.optim import AdamW4bit

        return AdamW4bit(parameters, **adam)
    if name == "adamw_bf16":
        from torchao.optim import _AdamW

        return _AdamW(parameters, bf16_stochastic_round=True, **adam)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed lr (the schedule comes from --lr_scheduler), no first moment: the memory-lean setting.
        return Adafactor(
            parameters,
            lr=learning_rate,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            weight_decay=args.adam_weight_decay,
        )
    from prodigyopt import Prodigy

    return Prodigy(parameters, **adam)


def parameter_groups(model: torch.nn.Module, text_encoder_lr: float | None = None) -> list:
    """The trainable parameters of a training module: one list, or with `text_encoder_lr` two parameter groups, the
    text encoder's at that learning rate."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    text_encoder = getattr(model, "text_encoder", None)
    if text_encoder_lr is None or text_encoder is None:
        return trainable
    text = {id(p) for p in text_encoder.parameters() if p.requires_grad}
    return [
        {"params": [p for p in trainable if id(p) not in text]},
        {"params": [p for p in trainable if id(p) in text], "lr": text_encoder_lr},
    ]


def create_optimizer_and_schedule(accelerator, args: argparse.Namespace, parameters: list, max_train_steps: int):
    """The optimizer and diffusers' lr schedule (`get_scheduler`, counted in the per-process steps Accelerate makes)."""
    from diffusers.optimization import get_scheduler

    if args.optimizer == "adamw_bf16" and accelerator.mixed_precision == "fp16":
        raise ValueError(
            "`--optimizer adamw_bf16` trains bfloat16 weights: use `--mixed_precision bf16` (or no), not fp16."
        )
    learning_rate = args.learning_rate
    if args.scale_lr:
        scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        learning_rate *= scale
        parameters = [{**p, "lr": p["lr"] * scale} if isinstance(p, dict) and "lr" in p else p for p in parameters]
    optimizer = create_optimizer(args, parameters, learning_rate)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    return optimizer, lr_scheduler
