# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The command-line flags both training scripts share, their checks, the model config they give, and the flags as
tracker hyper-parameters."""

import argparse
import inspect
import json
import math
import os

from ..models.transformer_pixnerd import PixNerdTransformer2DModel
from .objectives import LOSS_WEIGHTING, TIMESTEP_SAMPLING
from .optimizers import OPTIMIZERS, check_optimizer_available
from .validation import parse_validation_sizes

# The arguments a saved config may carry besides the model's own (diffusers writes these into config.json).
_SAVED_CONFIG_KEYS = {"_class_name", "_diffusers_version", "_name_or_path"}
_MODEL_PARAMETERS = inspect.signature(PixNerdTransformer2DModel.__init__).parameters
MODEL_CONFIG_KEYS = (set(_MODEL_PARAMETERS) - {"self"}) | _SAVED_CONFIG_KEYS
MODEL_DEFAULTS = {name: p.default for name, p in _MODEL_PARAMETERS.items() if p.default is not inspect.Parameter.empty}


class TrainingHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` with each flag's default, "(default: x)", except where the help already speaks of its default or there
    is nothing to say: no default (`None`, the help says what happens then), an off switch (`False`) and the `--no_*`
    half of a switch."""

    def _get_help_string(self, action):
        unsaid = action.default is None or action.default is False or isinstance(action, argparse._StoreFalseAction)
        if unsaid or "default" in (action.help or "").lower():
            return action.help
        return super()._get_help_string(action)


def add_switch(group, name: str, default: bool | None, help: str):
    """`--name` / `--no_name` (snake case, as the other flags; argparse's BooleanOptionalAction writes `--no-name`)."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=help)
    group.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"Turn `--{name}` off.")


def add_training_arguments(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """The flags both scripts share; `defaults` sets each script's own defaults (learning rate, shift, ...)."""
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="A local image folder (see docs/training.md).")
    data.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset: Hub name or local path.")
    data.add_argument("--dataset_config_name", type=str, default=None, help="The configuration of `--dataset_name`.")
    data.add_argument("--dataset_split", type=str, default="train", help="The split of `--dataset_name` to train on.")
    data.add_argument("--image_column", type=str, default="image", help="The images column of `--dataset_name`.")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models downloaded are stored.")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset (needs `--max_train_steps`).")
    data.add_argument(
        "--mask_data_dir",
        type=str,
        default=None,
        help="Loss masks: a folder holding a PNG for each image of `--train_data_dir`, at the same relative path and "
        "name (white = learn, black = ignore, grays weight); cropped and flipped with their images.",
    )
    data.add_argument(
        "--alpha_mask", action="store_true", help="Loss masks from the images' alpha channel (opaque = learn)."
    )
    data.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer of a streamed dataset.")
    data.add_argument(
        "--resolution",
        type=int,
        default=defaults.get("resolution"),
        help="Training image size."
        + ("" if defaults.get("resolution") else " Default: the model's `sample_size` (the size it was trained at)."),
    )
    data.add_argument(
        "--image_preprocessing",
        choices=("adm_center_crop", "resize_center_crop", "pad"),
        default=defaults["image_preprocessing"],
        help="adm_center_crop: the official C2I crop; resize_center_crop: the official T2I one; pad: no crop, black "
        "padding to the size (a larger image is first scaled down, aspect kept, to fit; the run logs how many were).",
    )
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument(
        "--aspect_ratio_buckets",
        action="store_true",
        help="Keep the images' aspect ratios: batches of one size each, about `--resolution`**2 pixels, from 1:2 to "
        "2:1 (see docs/training.md).",
    )
    data.add_argument(
        "--dataloader_num_workers", type=int, default=4, help="Processes decoding images (capped by the CPUs)."
    )
    data.add_argument(
        "--fail_on_corrupt_images", action="store_true", help="Stop at an unreadable image instead of skipping it."
    )

    model = parser.add_argument_group("diffusion")
    model.add_argument(
        "--timestep_sampling", choices=TIMESTEP_SAMPLING, default="logit_normal", help="How training sigmas are drawn."
    )
    model.add_argument("--logit_mean", type=float, default=0.0, help="Mean of `logit_normal` timestep sampling.")
    model.add_argument("--logit_std", type=float, default=1.0, help="Std of `logit_normal` timestep sampling.")
    model.add_argument("--mode_scale", type=float, default=1.29, help="Scale of `mode` timestep sampling (SD3).")
    model.add_argument(
        "--shift",
        type=float,
        default=defaults["shift"],
        help="Time shift of the sampled sigmas."
        + (
            "" if defaults["shift"] is not None else " Default: 2 below 512 px, 4 from 512 px (the official settings)."
        ),
    )
    model.add_argument("--weighting_scheme", choices=LOSS_WEIGHTING, default="none", help="Per-sample loss weight.")
    dropout_default = defaults.get("condition_dropout", 0.1)
    model.add_argument(
        "--condition_dropout",
        type=float,
        default=dropout_default,
        help="Probability of the null condition (CFG)"
        + (" (default 0.1; 0 with --distill)." if dropout_default is None else "."),
    )
    model.add_argument(
        "--gradient_checkpointing", action="store_true", help="Recompute activations in backward: less memory, slower."
    )

    repa = parser.add_argument_group("REPA")
    add_switch(
        repa,
        "use_repa",
        defaults.get("use_repa"),
        "REPA alignment to DINOv2 (default: on from scratch and for full fine-tuning, off for LoRA).",
    )
    repa.add_argument("--repa_encoder", type=str, default="facebook/dinov2-base", help="DINOv2 name or folder.")
    repa.add_argument("--repa_align_layer", type=int, default=defaults["repa_align_layer"], help="1-based block.")
    repa.add_argument("--repa_loss_weight", type=float, default=0.5, help="Weight of the REPA loss in the total loss.")
    repa.add_argument("--repa_projector_dim", type=int, default=None, help="Projector width (default: hidden size).")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=defaults["train_batch_size"], help="Per device.")
    optim.add_argument("--num_train_epochs", type=int, default=100, help="Run length, without `--max_train_steps`.")
    optim.add_argument(
        "--max_train_steps", type=int, default=None, help="Overrides `--num_train_epochs`. Default: the epochs' steps."
    )
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    optim.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adamw",
        help="adamw (torch), adamw8bit (bitsandbytes), adamw4bit (torchao), adamw_bf16 (torchao, bfloat16 weights with "
        "stochastic rounding), adafactor (transformers), prodigy (prodigyopt; use --learning_rate 1.0). See "
        "docs/training.md#memory.",
    )
    optim.add_argument(
        "--learning_rate",
        type=float,
        default=defaults.get("learning_rate"),
        help="Peak learning rate (after warm-up)."
        + (
            ""
            if defaults.get("learning_rate")
            else " Default: 1e-4 with --use_lora or from scratch, 1e-5 for a full fine-tune (the official SFT's)."
        ),
    )
    optim.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch size, accumulation, GPUs.")
    optim.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial".',
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=0, help="Linear warm-up steps of the lr schedule.")
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts of `cosine_with_restarts`.")
    optim.add_argument("--lr_power", type=float, default=1.0, help="Power of the `polynomial` lr schedule.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optim.add_argument("--adam_beta2", type=float, default=defaults.get("adam_beta2", 0.999), help="AdamW beta2.")
    optim.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW (decoupled) weight decay.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument("--max_grad_norm", type=float, default=defaults["max_grad_norm"], help="0 turns clipping off.")
    optim.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: accelerate's."
    )
    optim.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs (faster, less exact).")
    optim.add_argument("--cpu", action="store_true", help="Train on the CPU even if an accelerator is present.")
    optim.add_argument("--seed", type=int, default=None, help="Default: drawn once and stored in the checkpoints.")
    add_switch(
        optim,
        "use_ema",
        defaults.get("use_ema", True),
        "Keep an EMA of the weights and export it (default: on, off for LoRA).",
    )
    optim.add_argument(
        "--ema_decay",
        type=float,
        default=None,
        help="Default: from the run length, the official 0.9999 for runs of 46,000+ steps, else 1 - 10 / steps (so "
        "the export always reflects the training; see docs/training.md#ema).",
    )
    optim.add_argument(
        "--ema_device",
        choices=("accelerator", "cpu"),
        default="accelerator",
        help="Where the float32 EMA lives: `cpu` frees 4 bytes per trained parameter on the accelerator (the weights "
        "are copied to the CPU at each EMA update).",
    )
    optim.add_argument(
        "--ema_update_interval",
        type=int,
        default=1,
        help="Update the EMA every N optimizer steps (with the decay raised to the power N, so it averages over the "
        "same number of steps); with `--ema_device cpu` this divides the copies to the CPU by N.",
    )
    add_switch(
        optim,
        "ema_warmup",
        False,
        "Ramp the EMA decay up as diffusers does, min(decay, (1 + n) / (10 + n)), instead of the official constant "
        "decay from the first step (use it for short runs from scratch).",
    )

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output_dir", type=str, default=defaults["output_dir"], help="Checkpoints, logs, samples and the export."
    )
    run.add_argument("--overwrite_output_dir", action="store_true", help="Start over in a folder with an earlier run.")
    run.add_argument(
        "--checkpointing_steps", type=int, default=5000, help="Save a checkpoint every N steps (and at the last one)."
    )
    run.add_argument(
        "--checkpoints_total_limit",
        type=int,
        default=None,
        help="Keep only the newest N checkpoints. Default: all (a LoRA checkpoint holds the adapters only, 0.3 GB for "
        "XXL/16 at rank 32, and each is a LoRA to compare; a full XXL/16 one is 19 GB: set it for full runs).",
    )
    run.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest", a checkpoint name or path.')
    run.add_argument(
        "--validation_steps",
        type=int,
        default=None,
        help="Sample validation images every N steps, and at step 0 before the first step (the baseline; not again "
        "when resuming). Default: none, only the final samples of the model card.",
    )
    run.add_argument(
        "--validation_sizes",
        type=str,
        nargs="+",
        default=None,
        help="Sizes of the validation images: `N` (N x N) or `HxW` (height x width, non-square allowed), multiples "
        "of the model's `resolution_multiple`, e.g. `256 256x512`. Default: the training `--resolution`.",
    )
    run.add_argument("--validation_num_inference_steps", type=int, default=None, help="Default: the scheduler's.")
    run.add_argument("--validation_guidance_scale", type=float, default=None, help="Default: the scheduler's.")
    run.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside `--output_dir`.")
    run.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    run.add_argument(
        "--tracker_project_name",
        type=str,
        default=defaults["tracker_project_name"],
        help="The project name in TensorBoard / W&B.",
    )
    run.add_argument(
        "--push_to_hub",
        action="store_true",
        help="Upload the export (no checkpoints) to the Hub at the end; the access is checked before training.",
    )
    run.add_argument(
        "--hub_model_id",
        type=str,
        default=None,
        help='The repo, "name" or "org/name" (default: the name of `--output_dir`).',
    )
    run.add_argument(
        "--hub_token", type=str, default=None, help="Default: the `HF_TOKEN` variable or `hf auth login`'s token."
    )
    return parser


def require_training_extra(*modules: str):
    """Names the `[training]` extra when a package the training scripts need is missing (not a bare
    ModuleNotFoundError deep in a run)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f'Training needs {", ".join(missing)}: `pip install "diffusers-pixnerd[training]"` (datasets, peft, '
            "tensorboard)."
        )


def check_training_arguments(args: argparse.Namespace, needs_data: bool = True):
    """Flag combinations that cannot work, reported before anything loads. `needs_data=False`: the run makes its own
    data (distillation) and takes no data flags (its own checks refuse them)."""
    require_training_extra("datasets", *(["peft"] if getattr(args, "use_lora", False) else []))
    if needs_data and (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("Pass exactly one of `--train_data_dir` (a local folder) and `--dataset_name`.")
    if args.streaming and args.max_train_steps is None:
        raise ValueError("`--streaming` datasets have no length: pass `--max_train_steps`.")
    if args.mask_data_dir is not None:
        if args.alpha_mask:
            raise ValueError("Pass one of `--mask_data_dir` (mask files) and `--alpha_mask` (the images' alpha).")
        if args.train_data_dir is None:
            raise ValueError("`--mask_data_dir` matches masks to the files of `--train_data_dir`: pass that folder.")
        if not os.path.isdir(args.mask_data_dir):
            raise ValueError(f"`--mask_data_dir` {args.mask_data_dir!r} is not a folder.")
    if getattr(args, "aspect_ratio_buckets", False) and args.image_preprocessing == "pad":
        raise ValueError(
            "`--aspect_ratio_buckets` resizes and crops each image to its bucket: use it with `--image_preprocessing` "
            "adm_center_crop or resize_center_crop, not pad."
        )
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        raise ValueError("Pass at most one of `--resume_from_checkpoint` and `--overwrite_output_dir`.")
    check_optimizer_available(args.optimizer)
    positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_train_epochs")
    positive += ("ema_update_interval",)
    for name in positive + ("max_train_steps", "validation_steps", "checkpoints_total_limit", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}.")
    args.validation_sizes = parse_validation_sizes(args.validation_sizes)  # the multiples: once the model is known
    if not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"`--condition_dropout` must be in [0, 1), got {args.condition_dropout}.")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"`--shift` must be a positive number, got {args.shift}.")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1], got {args.ema_decay}.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("`--report_to wandb` with `--hub_token` would expose the token; use `hf auth login` instead.")


def check_resolution(resolution: int, patch_size: int):
    """`--resolution` must cut into whole patches of the model."""
    if resolution % patch_size:
        raise ValueError(f"`--resolution` ({resolution}) must be a multiple of the model's patch size ({patch_size}).")


def _config_object(text: str, flag: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:  # its message gives the line and column
        raise ValueError(f"{flag} is not valid JSON: {error}.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{flag} must be a JSON object of model arguments, got {type(config).__name__}.")
    unknown = sorted(set(config) - MODEL_CONFIG_KEYS)
    if unknown:
        raise ValueError(
            f"{flag} has unknown model arguments {unknown}; `PixNerdTransformer2DModel` takes "
            f"{sorted(MODEL_CONFIG_KEYS)}."
        )
    return config


def model_config_from_args(args: argparse.Namespace, presets: dict, **overrides) -> dict:
    """A new transformer's arguments: the preset or JSON file `--model_config`, the inline JSON `--model_config_json`
    on top, then `overrides` (the training resolution, the data's classes, the text encoder's width)."""
    if args.model_config in presets:
        config = dict(presets[args.model_config])
    else:
        try:
            with open(args.model_config, encoding="utf-8") as f:
                text = f.read()
        except OSError as error:
            raise ValueError(
                f"`--model_config` {args.model_config!r}: not a preset nor a JSON file ({error})."
            ) from None
        config = _config_object(text, f"`--model_config` {args.model_config!r}")
    if args.model_config_json:
        config.update(_config_object(args.model_config_json, "`--model_config_json`"))
    config.update(overrides)
    if config.get("sample_size") is not None:
        check_resolution(config["sample_size"], config.get("patch_size", MODEL_DEFAULTS["patch_size"]))
    return config


def tracker_config(args: argparse.Namespace) -> dict:
    """The flags as tracker hyper-parameters (TensorBoard takes numbers, strings and booleans only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
