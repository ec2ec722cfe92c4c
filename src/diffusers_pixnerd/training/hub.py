# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The model card of a trained model (the settings used, which weights were exported) and the upload to the Hub."""

import argparse
import json
import logging
import os

from ..pipelines.model_card import CARD_MARKER, card_text, shown_path
from .checkpoints import CHECKPOINT_PREFIX
from .validation import baseline_images

logger = logging.getLogger(__name__)

# The settings a model card lists, each with the condition under which it was used.
MODEL_CARD_SETTINGS = {
    "pretrained_model_name_or_path": None,
    "model_config": None,
    "text_encoder_name_or_path": lambda a: a.model_config is not None,
    "dataset_name": None,
    "train_data_dir": None,
    "dataset_config": None,
    "mask_data_dir": None,
    "alpha_mask": lambda a: getattr(a, "alpha_mask", False),
    "resolution": None,
    "image_preprocessing": None,
    "aspect_ratio_buckets": lambda a: getattr(a, "aspect_ratio_buckets", False),
    "train_batch_size": None,
    "gradient_accumulation_steps": None,
    "optimizer": None,
    "learning_rate": None,
    "lr_scheduler": None,
    "lr_warmup_steps": lambda a: a.lr_warmup_steps > 0,
    "adam_beta1": None,
    "adam_beta2": None,
    "adam_weight_decay": None,
    "max_grad_norm": lambda a: a.max_grad_norm > 0,
    "mixed_precision": None,
    # A distillation run draws its sigmas from its sampler's grid (`distill_steps`, `distill_shift`) instead.
    "timestep_sampling": lambda a: not getattr(a, "distill", False),
    "logit_mean": lambda a: a.timestep_sampling == "logit_normal" and not getattr(a, "distill", False),
    "logit_std": lambda a: a.timestep_sampling == "logit_normal" and not getattr(a, "distill", False),
    "shift": lambda a: not getattr(a, "distill", False),
    "weighting_scheme": None,
    "condition_dropout": None,
    "use_repa": None,
    "repa_encoder": lambda a: a.use_repa,
    "repa_align_layer": lambda a: a.use_repa,
    "repa_loss_weight": lambda a: a.use_repa,
    "use_ema": None,
    "ema_decay": lambda a: a.use_ema,
    "ema_warmup": lambda a: a.use_ema and a.ema_warmup,
    "ema_update_interval": lambda a: a.use_ema and getattr(a, "ema_update_interval", 1) > 1,
    "use_lora": lambda a: getattr(a, "use_lora", False),
    "lora_rank": lambda a: a.use_lora,
    "lora_alpha": lambda a: a.use_lora,
    "lora_dropout": lambda a: a.use_lora and a.lora_dropout > 0,
    "lora_target_modules": lambda a: a.use_lora,
    "use_dora": lambda a: getattr(a, "use_dora", False),
    "train_text_encoder": lambda a: getattr(a, "train_text_encoder", False),
    "text_encoder_lora_rank": lambda a: getattr(a, "train_text_encoder", False),
    "text_encoder_lr": lambda a: getattr(a, "train_text_encoder", False) and a.text_encoder_lr is not None,
    "text_encoder_lora_target_modules": lambda a: getattr(a, "train_text_encoder", False),
    "text_encoder_token_words": None,
    "train_text_encoder_layers": lambda a: getattr(a, "train_text_encoder_layers", 0) > 0,
    "precompute_text_embeddings": lambda a: getattr(a, "precompute_text_embeddings", False),
    "reg_data_dir": None,  # the regularisation flags: set (defaults filled) only in a regularised run
    "reg_prompts_file": None,
    "num_reg_images": None,
    "reg_ratio": None,
    "reg_loss_weight": None,
    "output_preservation_word": None,
    "output_preservation_weight": None,
    "output_preservation_reg": lambda a: a.output_preservation_reg,
    "text_preservation_weight": None,
    "caption_context_words": lambda a: getattr(a, "caption_context_words", 0) > 0,
    "distill": lambda a: getattr(a, "distill", False),  # the distillation flags: filled only in a distillation run
    "distill_prompts_file": None,
    "num_distill_samples": None,
    "distill_steps": None,
    "distill_shift": None,
    "distill_num_inference_steps": None,
    "teacher_guidance_scale": None,
    "teacher_num_inference_steps": None,
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


def model_card_training_section(
    args: argparse.Namespace,
    script: str,
    global_step: int,
    sample_paths: list,
    chosen: dict | None = None,
) -> str:
    """Markdown for the model card: how it was trained (the settings used), what was exported, the final samples and,
    with `--validation_steps`, the step-0 samples of the same prompts and seeds (before training) beside them.
    `chosen`: the values the run chose for flags left unset (`{"ema_decay": ...}`), shown in their place."""
    baseline_paths = baseline_images(sample_paths, args.output_dir) if args.validation_steps else []
    args = argparse.Namespace(**{**vars(args), **(chosen or {})})  # a copy: the flags are left as given
    settings = used_settings(args)
    shortened = [k for k, v in settings.items() if isinstance(v, str) and os.path.isabs(v)]
    rows = "\n".join(f"| `{k}` | `{shown_path(v) if k in shortened else v}` |" for k, v in settings.items())
    if shortened:
        rows += "\n\nLocal folders and files given as absolute paths are shown by their name."
    images = markdown_images(sample_paths, args.output_dir)
    if images and baseline_paths:
        images = (
            f"After training (step {global_step}, the exported weights):\n\n{images}\n\nBefore training (step 0, "
            f"the same prompts and seeds):\n\n{markdown_images(baseline_paths, args.output_dir)}"
        )
    return (
        f"## Training\n\nTrained with `examples/{script}` of diffusers-pixnerd for {global_step} steps. Exported: "
        f"{exported_weights_note(args, global_step)}.\n\n| setting | value |\n| --- | --- |\n{rows}\n\n"
        + (f"## Samples\n\n{images}\n" if images else "")
    )


def markdown_images(paths: list, folder: str) -> str:
    """Markdown images of `paths`, relative to `folder`, one a line (one paragraph: side by side)."""
    return "\n".join(f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.relpath(p, folder)})" for p in paths)


class HubAccessError(ValueError):
    """`--push_to_hub` cannot work (an invalid repo id, no token, offline mode, a rejected token, a repo the token
    cannot write to). Raised before training; the scripts print it without a traceback."""


def token_source(args: argparse.Namespace) -> str:
    """Where the token of this run comes from, as the messages name it (`huggingface_hub.get_token`'s order)."""
    if args.hub_token:
        return "`--hub_token`"
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return "the `HF_TOKEN` environment variable"
    return "`hf auth login`"


def hub_access_problem(error: Exception, args: argparse.Namespace) -> str:
    """What a failed `whoami` means for `--push_to_hub`: no token, offline mode, a rejected token, or no answer."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

    later = f"or train without `--push_to_hub` and upload the folder afterwards ({UPLOAD_DOCS})"
    if isinstance(error, OfflineModeIsEnabled):
        return f"offline mode is on (`HF_HUB_OFFLINE=1`): the Hub cannot be reached. Unset it for this run, {later}."
    if isinstance(error, LocalTokenNotFoundError):
        offline = " Offline mode is on too (`HF_HUB_OFFLINE=1`): unset it for this run."
        return (
            "no Hugging Face token found. Log in once with `hf auth login` (a token with write access, from "
            "https://huggingface.co/settings/tokens), set `HF_TOKEN`, or pass `--hub_token`."
            + (offline if constants.HF_HUB_OFFLINE else "")
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return (
            f"the Hub rejected the token from {token_source(args)} as invalid (mistyped, expired or revoked). Create "
            "one with write access at https://huggingface.co/settings/tokens and log in with `hf auth login --force`."
        )
    if status is not None:
        return f"the Hub answered the token check with HTTP {status}: {error}"
    return f"the Hub did not accept the token or could not be reached ({type(error).__name__}: {error}); {later}."


def hub_write_problem(info: dict, repo_id: str, source: str) -> str | None:
    """Why the token `whoami` described in `info` cannot write to `repo_id` ("namespace/name"); `None` when it can, or
    when `info` does not say (the upload then reports it)."""
    namespace, user = repo_id.split("/")[0], info.get("name")
    org_roles = {org.get("name"): org.get("roleInOrg") for org in info.get("orgs") or []}
    token = (info.get("auth") or {}).get("accessToken") or {}
    if token.get("role") == "read":
        return (
            f"the token from {source} is read-only: create one with write access at "
            "https://huggingface.co/settings/tokens and log in with `hf auth login --force`."
        )
    if namespace != user and namespace not in org_roles:
        orgs = ", ".join(sorted(org_roles)) or "none"
        return (
            f"the repo {repo_id!r} is not writable with the token from {source}: it belongs to {user!r}, who is not "
            f"{namespace!r} nor a member of it (your organisations: {orgs}). Pass a `--hub_model_id` under your user "
            f"name or one of your organisations, e.g. `--hub_model_id {user}/{repo_id.split('/')[1]}`."
        )
    if org_roles.get(namespace) == "read":
        return (
            f"the repo {repo_id!r} is not writable: {user!r} only has read access in the organisation {namespace!r}."
        )
    if token.get("role") == "fineGrained":
        scoped = (token.get("fineGrained") or {}).get("scoped") or []
        writable = [(e.get("entity") or {}).get("name") for e in scoped if "repo.write" in e.get("permissions", [])]
        if namespace not in writable and repo_id not in writable:
            return (
                f"the repo {repo_id!r} is not writable with the fine-grained token from {source}: it has no "
                f"`repo.write` permission on {namespace!r} (nor on the repo). Add it at "
                "https://huggingface.co/settings/tokens."
            )
    return None


def check_hub_access(args: argparse.Namespace) -> str:
    """Before training with `--push_to_hub`: a valid repo id, a token the Hub accepts (`whoami`) and that can write to
    the repo. Returns the full repo id ("user/name"), which the model card names; else raises `HubAccessError` saying
    which of these failed."""
    from huggingface_hub import whoami
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    try:
        validate_repo_id(name)
    except HFValidationError as error:
        raise HubAccessError(f"`--hub_model_id` {name!r} is not a valid Hub repo id: {error}") from None
    try:
        info = whoami(token=args.hub_token)
    except Exception as error:  # noqa: BLE001 - each failure is explained in words; none needs a traceback
        raise HubAccessError(f"`--push_to_hub`: {hub_access_problem(error, args)}") from None
    repo_id = name if "/" in name else f"{info['name']}/{name}"
    problem = hub_write_problem(info, repo_id, token_source(args))
    if problem is not None:
        raise HubAccessError(f"`--push_to_hub`: {problem}")
    return repo_id


UPLOAD_DOCS = "docs/training.md#sharing-a-trained-model"


def upload_ignore_patterns(logging_dir: str = "logs") -> list[str]:
    """What an upload of a training folder leaves out: checkpoints, tracker logs, intermediate validation images and
    cached prompt embeddings (the export, its model card and the samples it shows stay: the final ones and the step-0
    baseline)."""
    return [f"{CHECKPOINT_PREFIX}*", f"{logging_dir}/*", "validation/step-[1-9]*", "cache/*"]


def upload_output_dir(
    output_dir: str,
    repo_id: str,
    token: str | None = None,
    logging_dir: str = "logs",
    commit_message: str = "Upload the trained model",
) -> str:
    """Uploads a training `--output_dir` to the Hub repo `repo_id` (created if needed) without what
    `upload_ignore_patterns` lists, e.g. after a run trained without `--push_to_hub`. Returns the repo id."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(repo_id, exist_ok=True, token=token).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        token=token,
        ignore_patterns=upload_ignore_patterns(logging_dir),
    )
    return repo_id


def push_folder(args: argparse.Namespace, repo_id: str | None = None, commit_message: str = "End of training"):
    """Uploads `--output_dir` at the end of a `--push_to_hub` run (`upload_output_dir`) to `repo_id`, the full id that
    `check_hub_access` returned (default: `--hub_model_id`, else the folder's name)."""
    name = repo_id or args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    return upload_output_dir(args.output_dir, name, args.hub_token, args.logging_dir, commit_message)


LORA_MODEL_CARD = """
{marker}
# {title}

LoRA weights (rank {rank}, on the modules {targets}) for the PixNerd text-to-image pipeline {base}, in diffusers'
format.
{usage}
{extra}"""

LORA_USAGE = """
```py
from diffusers_pixnerd import PixNerdT2IPipeline

pipe = PixNerdT2IPipeline.from_pretrained({base_id}){base_note}
pipe.load_lora_weights({repo}){repo_note}
image = pipe({prompt}).images[0]  # attention_kwargs={{"scale": 0.5}} for half the effect
```
"""

FEW_STEP_LORA_USAGE = """
**A few-step LoRA**: distilled from the base model to sample in {steps} steps (trained for {distilled} steps) with
the guidance baked in: Euler steps at shift {shift}, `guidance_scale=1.0`, one transformer call per step. The teacher
was the base model's own sampler ({teacher}) on {num_samples} samples of the prompts of `{prompts_file}`.
`load_pipeline` applies these settings (`few_step_sampler.json`); a call's arguments override them.

```py
from diffusers_pixnerd import load_pipeline

pipe = load_pipeline({base_id}, lora={repo}){repo_note}
image = pipe({prompt}, num_inference_steps={steps}, guidance_scale=1.0).images[0]
```
"""


def local_folder_note(name_or_path: str, what: str) -> str:
    """The comment after a local folder in a card's usage snippet (`shown_path` keeps only the name of an absolute
    path, so the reader is told to give its own)."""
    return f"  # {what}: a local folder" + (" (its name; give its path)" if os.path.isabs(name_or_path) else "")


def lora_model_card(
    args, extra: str, repo_id: str | None = None, sampler: dict | None = None, teacher: dict | None = None
) -> str:
    """The LoRA card: `base_model` only when the base is a Hub repo; the usage loads the base as the run named it (a
    Hub id, or the path given, see `shown_path`) and the LoRA from `repo_id` when pushed, else from this folder. A
    few-step LoRA (`sampler` and `teacher`, see `training/distill.py`) states its step count and settings."""
    base = args.pretrained_model_name_or_path
    base_id = hub_model_id(base)
    names = {
        "base_id": json.dumps(base_id or shown_path(base)),
        "base_note": "" if base_id else local_folder_note(base, "the base pipeline"),
        "repo": json.dumps(repo_id or shown_path(args.output_dir)),
        "repo_note": "" if repo_id else local_folder_note(args.output_dir, "this folder"),
        "prompt": json.dumps(args.validation_prompts[0], ensure_ascii=False),
    }
    if sampler is None:
        usage = LORA_USAGE.format(**names)
    else:
        solver = "Adams-2" if teacher["solver_order"] == 2 else "Euler"
        low, high = teacher["guidance_interval"]
        usage = FEW_STEP_LORA_USAGE.format(
            steps=sampler["num_inference_steps"],
            distilled=", ".join(map(str, sampler["distilled_steps"])),
            shift=sampler["shift"],
            teacher=f"{solver}, {teacher['num_inference_steps']} steps, shift {teacher['shift']}, CFG "
            f"{teacher['guidance_scale']} on {low} < t < {high}",
            num_samples=args.num_distill_samples,
            prompts_file=os.path.basename(args.distill_prompts_file),
            **names,
        )
    body = LORA_MODEL_CARD.format(
        marker=CARD_MARKER,
        title=repo_id or os.path.basename(os.path.normpath(args.output_dir)),
        rank=args.lora_rank,
        targets=", ".join(f"`{name.strip()}`" for name in args.lora_target_modules.split(",")),
        base=f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{shown_path(base)}` (a local folder)",
        usage=usage,
        extra=extra,
    )
    return card_text(body, ["lora", "text-to-image"], base_id)


STALE_EXPORT_MARKER = "<!-- stale-export -->"


def mark_export_stale(output_dir: str, checkpoint: str) -> bool:
    """A run that continued training in `output_dir` (`--resume_from_checkpoint`, or `--overwrite_output_dir`) has
    committed `checkpoint`, newer than the model exported there before it started. The export stays (it may be the
    only finished model), but until this run exports again a notice at the top of its model card says that it is older
    than the newest checkpoint, so that it is not shared or used as the result of the continuation. A README.md that
    is not ours is left alone. Returns whether the card was marked (once per card)."""
    name = os.path.basename(checkpoint)
    logger.warning(
        "The model exported in %s is older than %s: its model card says so until this run ends and exports again.",
        output_dir,
        name,
    )
    path = os.path.join(output_dir, "README.md")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        card = f.read()
    if CARD_MARKER not in card or STALE_EXPORT_MARKER in card:
        return False
    notice = (
        f"{STALE_EXPORT_MARKER}\n> **Outdated export.** These weights were exported before a later run in this folder "
        f"(a continuation with `--resume_from_checkpoint`, or a restart with `--overwrite_output_dir`) saved `{name}`; "
        "that run has not finished. Resume it (`--resume_from_checkpoint latest`) to export the newest weights, which "
        "replace these and this card.\n"
    )
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(card.replace(CARD_MARKER, f"{CARD_MARKER}\n{notice}", 1))
    os.replace(temporary, path)  # a kill leaves the old card or the marked one, never half of it
    return True
