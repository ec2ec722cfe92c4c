# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The model card of a trained model (the settings used, which weights were exported) and the upload to the Hub."""

import argparse
import os

from ..pipelines.pipeline_utils import CARD_MARKER
from .checkpoints import CHECKPOINT_PREFIX

# The settings a model card lists, each with the condition under which it was used.
MODEL_CARD_SETTINGS = {
    "pretrained_model_name_or_path": None,
    "model_config": None,
    "text_encoder_name_or_path": lambda a: a.model_config is not None,
    "dataset_name": None,
    "train_data_dir": None,
    "resolution": None,
    "aspect_ratio_buckets": lambda a: getattr(a, "aspect_ratio_buckets", False),
    "train_batch_size": None,
    "gradient_accumulation_steps": None,
    "learning_rate": None,
    "lr_scheduler": None,
    "lr_warmup_steps": lambda a: a.lr_warmup_steps > 0,
    "adam_beta1": None,
    "adam_beta2": None,
    "adam_weight_decay": None,
    "max_grad_norm": lambda a: a.max_grad_norm > 0,
    "mixed_precision": None,
    "timestep_sampling": None,
    "logit_mean": lambda a: a.timestep_sampling == "logit_normal",
    "logit_std": lambda a: a.timestep_sampling == "logit_normal",
    "shift": None,
    "weighting_scheme": None,
    "condition_dropout": None,
    "use_repa": None,
    "repa_encoder": lambda a: a.use_repa,
    "repa_align_layer": lambda a: a.use_repa,
    "repa_loss_weight": lambda a: a.use_repa,
    "use_ema": None,
    "ema_decay": lambda a: a.use_ema,
    "ema_warmup": lambda a: a.use_ema and a.ema_warmup,
    "use_lora": lambda a: getattr(a, "use_lora", False),
    "lora_rank": lambda a: a.use_lora,
    "lora_alpha": lambda a: a.use_lora,
    "lora_dropout": lambda a: a.use_lora and a.lora_dropout > 0,
    "lora_target_modules": lambda a: a.use_lora,
    "train_text_encoder_layers": lambda a: getattr(a, "train_text_encoder_layers", 0) > 0,
    "precompute_text_embeddings": lambda a: getattr(a, "precompute_text_embeddings", False),
    "seed": None,
}


def used_settings(args: argparse.Namespace) -> dict:
    """The flags of `MODEL_CARD_SETTINGS` that this run has and used (no REPA encoder when REPA was off, ...)."""
    used = {}
    for key, condition in MODEL_CARD_SETTINGS.items():
        value = getattr(args, key, None)
        if value is not None and (condition is None or condition(args)):
            used[key] = value
    return used


def hub_model_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repo ("org/name"), `None` for a local path (never written as `base_model`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name_or_path or os.path.exists(name_or_path):
        return None
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return None
    return name_or_path


def exported_weights_note(args: argparse.Namespace, global_step: int) -> str:
    """Which weights an export holds, in a sentence (the EMA and how much of the starting weights it keeps)."""
    if not getattr(args, "use_ema", False):
        return "the trained weights (no EMA)"
    if args.ema_warmup:
        return f"the EMA of the weights (decay {args.ema_decay:g} with diffusers' warm-up)"
    share = args.ema_decay**global_step
    return (
        f"the EMA of the weights (constant decay {args.ema_decay:g}, an average over about the last "
        f"{round(1 / max(1 - args.ema_decay, 1e-12))} steps; the starting weights weigh {100 * share:.2g}% of it)"
    )


def model_card_training_section(args: argparse.Namespace, script: str, global_step: int, sample_paths: list) -> str:
    """Markdown for the model card: how it was trained (the settings used), what was exported, the final samples."""
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in used_settings(args).items())
    images = "\n".join(
        f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.relpath(p, args.output_dir)})" for p in sample_paths
    )
    return (
        f"## Training\n\nTrained with `examples/{script}` of diffusers-pixnerd for {global_step} steps. Exported: "
        f"{exported_weights_note(args, global_step)}.\n\n| setting | value |\n| --- | --- |\n{rows}\n\n"
        + (f"## Samples\n\n{images}\n" if images else "")
    )


def check_hub_access(args: argparse.Namespace) -> str:
    """Before training with `--push_to_hub`: a valid repo id and a token that the Hub accepts. Returns the full repo
    id ("user/name"), which the model card names."""
    from huggingface_hub import whoami
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise ValueError(f"`--hub_model_id` {name!r} is not a valid Hub repo id: {error}") from None
    try:
        user = whoami(token=args.hub_token)["name"]
    except Exception as error:  # no token, a rejected token, or no network: all stop the run before it trains
        raise ValueError(
            f"`--push_to_hub`: the Hub did not accept the token (`--hub_token`, or `hf auth login`): {error}"
        ) from None
    return name if "/" in name else f"{user}/{name}"


def push_folder(args: argparse.Namespace, commit_message: str = "End of training"):
    """Uploads `--output_dir` without checkpoints, logs and intermediate validation images."""
    from huggingface_hub import create_repo, upload_folder

    name = (
        getattr(args, "hub_repo_id", None) or args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    )
    repo_id = create_repo(name, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message=commit_message,
        token=args.hub_token,
        ignore_patterns=[
            f"{CHECKPOINT_PREFIX}*",
            f"{args.logging_dir}/*",
            "validation/step-*",
            "cache/*",
        ],
    )
    return repo_id


LORA_MODEL_CARD = """---
library_name: diffusers
license: mit
{base_model_line}tags:
- diffusers-pixnerd
- pixnerd
- lora
- text-to-image
---

{marker}
# {title}

LoRA weights (rank {rank}, on the modules {targets}) for the PixNerd text-to-image pipeline {base}, in diffusers'
format.

```py
from diffusers_pixnerd import PixNerdT2IPipeline

pipe = PixNerdT2IPipeline.from_pretrained("{base_id}")
pipe.load_lora_weights("{repo}")
image = pipe("{prompt}").images[0]  # attention_kwargs={{"scale": 0.5}} for half the effect
```

{extra}"""


def lora_model_card(args, extra: str) -> str:
    """The LoRA card: `base_model` only when the base is a Hub repo, the real repo id when pushed, the targets."""
    base_id = hub_model_id(args.pretrained_model_name_or_path)
    return LORA_MODEL_CARD.format(
        marker=CARD_MARKER,
        base_model_line=f"base_model: {base_id}\n" if base_id else "",
        title=getattr(args, "hub_repo_id", None) or os.path.basename(os.path.normpath(args.output_dir)),
        rank=args.lora_rank,
        targets=", ".join(f"`{name.strip()}`" for name in args.lora_target_modules.split(",")),
        base=f"[{base_id}](https://huggingface.co/{base_id})" if base_id else "(a local pipeline folder)",
        base_id=base_id or "path/to/the/base/pipeline",
        repo=getattr(args, "hub_repo_id", None) or args.output_dir,
        prompt=args.validation_prompts[0],
        extra=extra,
    )
