# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""What the PixNerd training scripts share: the rectified-flow loss with REPA, timestep sampling, EMA, checkpoints that
survive a kill, exact resume, and the bookkeeping of a run (`TrainingRun`).

The recipe is the official one (`src/diffusion/flow_matching/training_repa.py`, `configs_c2i/`, `configs_t2i/`), in
diffusers' convention: `x_t = (1 - sigma) x0 + sigma noise`; the model predicts `noise - x0` from `timestep = 1000
sigma`.
"""

import argparse
import errno
import json
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from .models.transformer_pixnerd import NUM_TRAIN_TIMESTEPS
from .schedulers.scheduling_pixnerd import PixNerdFlowMatchScheduler

logger = logging.getLogger(__name__)

TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
CHECKPOINT_PREFIX = "checkpoint-"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
TRAINING_STATE_FILE = "training_state.json"
EXPORT_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors")  # the files of a finished run's export
EMA_FILE = "ema.pt"
# ImageNet normalisation of DINOv2's inputs (timm's IMAGENET_DEFAULT_MEAN / STD, as in the official encoder.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------- timesteps and the loss


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The official time shift `t / (t + (1 - t) shift)` in sigma = 1 - t: `shift sigma / (1 + (shift - 1) sigma)`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sample_sigmas(
    batch_size: int,
    sampling: str = "logit_normal",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Noise levels (batch_size,) in float32: `sigmoid(N(logit_mean, logit_std))` (the paper's), uniform, or SD3's
    "mode" density, then shifted. The density is on sigma (a positive `logit_mean` favours noisier samples)."""
    if sampling not in TIMESTEP_SAMPLING:
        raise ValueError(f"`sampling` must be one of {TIMESTEP_SAMPLING}, got {sampling!r}.")
    u = compute_density_for_timestep_sampling(
        sampling, batch_size, logit_mean, logit_std, mode_scale, device=device, generator=generator
    )
    return shift_sigmas(u.float(), shift)


def flow_matching_loss(
    model_output: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting_scheme: str = "none"
) -> torch.Tensor:
    """Mean squared error on the velocity, in float32, weighted per sample ("none" is the official constant weight)."""
    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float()).reshape(-1, 1, 1, 1)
    return (weights * (model_output.float() - target.float()) ** 2).mean()


def condition_drop_mask(batch_size: int, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples train unconditionally (null class / empty prompt), for classifier-free guidance (official 0.1)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(batch_size, generator=generator, device=device) < probability


def random_flip(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flips each image horizontally with probability 1/2 (drawn from `generator`, so a resumed run flips the same)."""
    device = generator.device if generator is not None else pixels.device
    flip = (torch.rand(pixels.shape[0], generator=generator, device=device) < 0.5).to(pixels.device)
    return torch.where(flip.reshape(-1, 1, 1, 1), pixels.flip(-1), pixels)


# ------------------------------------------------------------------------------------------------------------- REPA


class REPAProjector(nn.Sequential):
    """The REPA projector (the official `build_mlp`): Linear(h, p), SiLU, Linear(p, p), SiLU, Linear(p, encoder_dim)."""

    def __init__(self, hidden_size: int, encoder_dim: int, projector_dim: int | None = None):
        projector_dim = projector_dim or hidden_size
        super().__init__(
            nn.Linear(hidden_size, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, projector_dim),
            nn.SiLU(),
            nn.Linear(projector_dim, encoder_dim),
        )


def load_repa_encoder(name_or_path: str, **kwargs) -> nn.Module:
    """A frozen DINOv2 (`transformers` Dinov2Model, with or without registers) from the Hub or a local folder."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(name_or_path, **kwargs)
    if not hasattr(encoder.config, "patch_size") or "dinov2" not in encoder.config.model_type:
        raise ValueError(f"`--repa_encoder` {name_or_path!r} is a {encoder.config.model_type}; REPA needs DINOv2.")
    return encoder.eval().requires_grad_(False)


@torch.no_grad()
def repa_target_features(encoder: nn.Module, pixels: torch.Tensor, token_grid: tuple[int, int]) -> torch.Tensor:
    """DINOv2 patch features (B, N, C) of clean images in [-1, 1], ImageNet-normalised and resized (bicubic) to
    `encoder patch size x token_grid`, so that DINOv2's patch grid is the PixNerd token grid (the official `encoder.py`
    resizes to 14 H / 16)."""
    encoder_patch = encoder.config.patch_size
    x = (pixels.float() + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.interpolate(x, (encoder_patch * token_grid[0], encoder_patch * token_grid[1]), mode="bicubic")
    hidden = encoder(pixel_values=x.to(encoder.dtype)).last_hidden_state
    num_prefix = 1 + getattr(encoder.config, "num_register_tokens", 0)  # CLS (+ registers)
    return hidden[:, num_prefix:]


@contextmanager
def capture_block_output(transformer: nn.Module, align_layer: int) -> Iterator[list[torch.Tensor]]:
    """Records the hidden states after DiT block `align_layer` (1-based, as officially) during the next forward."""
    outputs: list[torch.Tensor] = []

    def hook(module, args, output):
        if not outputs:  # a gradient-checkpointed block runs again in backward; keep the forward output
            outputs.append(output[0] if isinstance(output, tuple) else output)

    handle = transformer.transformer_blocks[align_layer - 1].register_forward_hook(hook)
    try:
        yield outputs
    finally:
        handle.remove()


def repa_cosine_loss(projected: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """`mean(1 - cos)` over samples and tokens, in float32."""
    if projected.shape[:2] != features.shape[:2]:
        raise ValueError(
            f"REPA: {projected.shape[1]} PixNerd tokens but {features.shape[1]} DINOv2 patches; the image must have "
            "the transformer's token grid."
        )
    return (1 - F.cosine_similarity(projected.float(), features.float(), dim=-1)).mean()


# -------------------------------------------------------------------------------------------------- the loss module


def encode_prompts(text_encoder, tokenizer, prompts: list[str], transformer_config, device) -> torch.Tensor:
    """Text embeddings exactly as `PixNerdT2IPipeline` makes them (the official Qwen3 conditioner), from any text
    encoder module, also a wrapped one being trained."""
    from .pipelines.pipeline_pixnerd_t2i import encode_qwen3_prompts

    max_length, width = transformer_config.text_max_length, transformer_config.text_embed_dim
    return encode_qwen3_prompts(text_encoder, tokenizer, list(prompts), max_length, width, device)


class PixNerdTrainingModule(nn.Module):
    r"""
    The training objective as one module, which is what Accelerate prepares (DDP, FSDP and DeepSpeed wrap one model):
    the transformer and what trains with it, the REPA projector and the text encoder when some of its layers train.

    `forward` returns the losses of a batch: the rectified-flow MSE on `noise - x0`, plus `repa_loss_weight` times
    `1 - cos` between the projected hidden states of block `align_layer` and the DINOv2 features of the clean image.

    Parameters:
        transformer ([`PixNerdTransformer2DModel`]): the model being trained.
        projector ([`REPAProjector`], *optional*): turns REPA on.
        align_layer (`int`, defaults to 8): the block whose output is aligned (1-based; official 8 for C2I, 6 for T2I).
        repa_loss_weight (`float`, defaults to 0.5): the weight of the REPA term.
        weighting_scheme (`str`, defaults to `"none"`): the per-sample loss weight (`LOSS_WEIGHTING`).
        text_encoder (`nn.Module`, *optional*): a text encoder being trained; prompts are encoded inside `forward`.
        tokenizer (*optional*): its tokenizer.
        null_encoder_hidden_states (`torch.Tensor`, *optional*): the embedding of `""` of a frozen text encoder, used
            for the dropped conditions when `encoder_hidden_states` come precomputed.
    """

    def __init__(
        self,
        transformer: nn.Module,
        projector: nn.Module | None = None,
        align_layer: int = 8,
        repa_loss_weight: float = 0.5,
        weighting_scheme: str = "none",
        text_encoder: nn.Module | None = None,
        tokenizer=None,
        null_encoder_hidden_states: torch.Tensor | None = None,
    ):
        super().__init__()
        if weighting_scheme not in LOSS_WEIGHTING:
            raise ValueError(f"`weighting_scheme` must be one of {LOSS_WEIGHTING}, got {weighting_scheme!r}.")
        if projector is not None and not 1 <= align_layer <= len(transformer.transformer_blocks):
            raise ValueError(
                f"`align_layer` must be in [1, {len(transformer.transformer_blocks)}] (1-based), got {align_layer}."
            )
        self.transformer = transformer
        self.projector = projector
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.align_layer = align_layer
        self.repa_loss_weight = repa_loss_weight
        self.weighting_scheme = weighting_scheme
        self.noise_scheduler = PixNerdFlowMatchScheduler()
        if null_encoder_hidden_states is not None:
            self.register_buffer("null_encoder_hidden_states", null_encoder_hidden_states, persistent=False)

    def conditions(self, drop_mask, class_labels=None, encoder_hidden_states=None, prompts=None) -> dict:
        """The transformer's condition kwargs, the dropped samples given the null class / the empty prompt."""
        if class_labels is not None:
            null = torch.full_like(class_labels, self.transformer.config.num_classes)
            return {"class_labels": torch.where(drop_mask, null, class_labels)}
        if prompts is not None:
            # One encoder call for the prompts and "" (a DDP-wrapped encoder runs once per backward).
            device = drop_mask.device
            embeds = encode_prompts(self.text_encoder, self.tokenizer, [*prompts, ""], self.transformer.config, device)
            encoder_hidden_states, null = embeds[:-1], embeds[-1:]
        else:
            null = self.null_encoder_hidden_states
        null = null.to(encoder_hidden_states.dtype)
        return {"encoder_hidden_states": torch.where(drop_mask.reshape(-1, 1, 1), null, encoder_hidden_states)}

    def forward(
        self,
        pixels: torch.Tensor,
        noise: torch.Tensor,
        sigmas: torch.Tensor,
        drop_mask: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        prompts: list[str] | None = None,
        repa_features: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses `{"loss", "fm_loss"[, "repa_loss"]}` of clean `pixels` in [-1, 1] at noise levels `sigmas`."""
        condition = self.conditions(drop_mask, class_labels, encoder_hidden_states, prompts)
        timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        noisy = self.noise_scheduler.add_noise(pixels, noise, timesteps)
        repa = self.projector is not None
        with capture_block_output(self.transformer, self.align_layer) if repa else nullcontext() as hidden:
            model_output = self.transformer(noisy, timesteps, **condition).sample
        fm_loss = flow_matching_loss(model_output, noise - pixels, sigmas, self.weighting_scheme)
        losses = {"loss": fm_loss, "fm_loss": fm_loss}
        if self.projector is not None:
            losses["repa_loss"] = repa_cosine_loss(self.projector(hidden[0]), repa_features)
            losses["loss"] = fm_loss + self.repa_loss_weight * losses["repa_loss"]
        return losses


# -------------------------------------------------------------------------------------------------------------- EMA


def create_ema(parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999, warmup: bool = False) -> EMAModel:
    """diffusers' `EMAModel` in float32, with the official constant decay (`simple_ema.py`) or diffusers' warm-up.

    By default `min_decay = decay` and `update_after_step = -1` turn off diffusers' `(1 + n) / (10 + n)` warm-up, so
    that every update is `ema = decay ema + (1 - decay) param` from the first step on, as in the official runs (which
    are millions of steps long). A short run from scratch should pass `warmup=True`: the decay then follows
    `min(decay, (1 + n) / (10 + n))`, and the random initial weights do not linger in the average (with the constant
    decay they still weigh `decay ** steps` at the end: 9% after 2,400 steps at 0.999).
    """
    if warmup:
        ema = EMAModel(list(parameters), decay=decay, min_decay=0.0, update_after_step=0, foreach=False)
    else:
        ema = EMAModel(list(parameters), decay=decay, min_decay=decay, update_after_step=-1, foreach=False)
    ema.to(dtype=torch.float32)
    return ema


EMA_MAX_INITIAL_SHARE = 0.01  # the largest share of the starting weights in the exported EMA that is not warned about


def ema_decay_for_run(max_train_steps: int, official_decay: float = 0.9999) -> float:
    """The EMA decay of a run whose `--ema_decay` is not given: the official 0.9999 where the run is long enough for it
    (the starting weights weigh `decay ** steps` at the end, under 1% after 46,000 steps), else `1 - 10 / steps`, an
    average over about the last tenth of the run in which the starting weights weigh `exp(-10)`, 5e-5 (0 for runs of
    up to 10 steps: the raw weights)."""
    return min(official_decay, max(0.0, 1.0 - 10.0 / max_train_steps))


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


# ------------------------------------------------------------------------------------------------------ checkpoints


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


def read_training_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, TRAINING_STATE_FILE), encoding="utf-8") as f:
        return json.load(f)


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


def load_checkpoint_weights(transformer: nn.Module, checkpoint: str, use_ema: bool = True) -> str:
    """Puts the transformer weights of a full-training checkpoint folder into `transformer` (same config): its EMA
    when the run kept one and `use_ema`, else the trained weights. Returns which ("ema" or "trained")."""
    from safetensors.torch import load_file

    model_file = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(model_file):
        raise ValueError(f"{checkpoint!r} is not a training checkpoint folder (no model.safetensors).")
    transformer.load_state_dict(sub_state_dict(load_file(model_file), "transformer"))
    ema_file = os.path.join(checkpoint, EMA_FILE)
    if not (use_ema and os.path.isfile(ema_file)):
        return "trained"
    shadow = torch.load(ema_file, map_location="cpu", weights_only=True)["shadow_params"]
    parameters = list(transformer.parameters())
    if len(shadow) != len(parameters):
        raise ValueError(f"{ema_file} holds {len(shadow)} tensors, the transformer {len(parameters)} parameters.")
    with torch.no_grad():
        for parameter, value in zip(parameters, shadow):
            parameter.copy_(value)
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


def resume_command(argv: list[str] | None = None) -> str:
    """The command line of this run with `--resume_from_checkpoint latest` (and without `--overwrite_output_dir`)."""
    argv = list(sys.argv if argv is None else argv)
    kept, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name == "--resume_from_checkpoint":
            skip = "=" not in arg
            continue
        if name != "--overwrite_output_dir":
            kept.append(arg)
    launcher = "accelerate launch" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "python"
    return f"{launcher} {shlex.join([argv[0], *kept, '--resume_from_checkpoint', 'latest'])}"


def parameters_fingerprint(parameters: Iterable[torch.Tensor]) -> str:
    """A hash of parameter values, to compare replicas across processes."""
    import hashlib

    digest = hashlib.sha256()
    for p in parameters:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------- arguments


def add_switch(group, name: str, default: bool | None, help: str):
    """`--name` / `--no_name` (snake case, as the other flags; argparse's BooleanOptionalAction writes `--no-name`)."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=help)
    group.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"Turn `--{name}` off.")


def add_training_arguments(parser: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """The flags both scripts share; `defaults` sets each script's own defaults (learning rate, shift, ...)."""
    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", type=str, default=None, help="A local image folder (see docs/training.md).")
    data.add_argument("--dataset_name", type=str, default=None, help="A `datasets` dataset: Hub name or local path.")
    data.add_argument("--dataset_config_name", type=str, default=None)
    data.add_argument("--dataset_split", type=str, default="train")
    data.add_argument("--image_column", type=str, default="image")
    data.add_argument("--cache_dir", type=str, default=None, help="Where datasets and models downloaded are stored.")
    data.add_argument("--streaming", action="store_true", help="Stream the dataset (needs `--max_train_steps`).")
    data.add_argument("--shuffle_buffer_size", type=int, default=10_000, help="Shuffle buffer of a streamed dataset.")
    data.add_argument("--resolution", type=int, default=defaults.get("resolution"), help="Training image size.")
    data.add_argument(
        "--image_preprocessing",
        choices=("adm_center_crop", "resize_center_crop", "pad"),
        default=defaults["image_preprocessing"],
        help="adm_center_crop: the official C2I crop; resize_center_crop: the official T2I one; pad: pad to size.",
    )
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips.")
    data.add_argument("--dataloader_num_workers", type=int, default=4)
    data.add_argument(
        "--fail_on_corrupt_images", action="store_true", help="Stop at an unreadable image instead of skipping it."
    )

    model = parser.add_argument_group("diffusion")
    model.add_argument("--timestep_sampling", choices=TIMESTEP_SAMPLING, default="logit_normal")
    model.add_argument("--logit_mean", type=float, default=0.0)
    model.add_argument("--logit_std", type=float, default=1.0)
    model.add_argument("--mode_scale", type=float, default=1.29)
    model.add_argument("--shift", type=float, default=defaults["shift"], help="Time shift of the sampled sigmas.")
    model.add_argument("--weighting_scheme", choices=LOSS_WEIGHTING, default="none", help="Per-sample loss weight.")
    model.add_argument("--condition_dropout", type=float, default=0.1, help="Probability of the null condition (CFG).")
    model.add_argument("--gradient_checkpointing", action="store_true")

    repa = parser.add_argument_group("REPA")
    add_switch(
        repa,
        "use_repa",
        defaults.get("use_repa"),
        "REPA alignment to DINOv2 (default: on from scratch and for full fine-tuning, off for LoRA).",
    )
    repa.add_argument("--repa_encoder", type=str, default="facebook/dinov2-base", help="DINOv2 name or folder.")
    repa.add_argument("--repa_align_layer", type=int, default=defaults["repa_align_layer"], help="1-based block.")
    repa.add_argument("--repa_loss_weight", type=float, default=0.5)
    repa.add_argument("--repa_projector_dim", type=int, default=None, help="Projector width (default: hidden size).")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=defaults["train_batch_size"], help="Per device.")
    optim.add_argument("--num_train_epochs", type=int, default=100)
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides `--num_train_epochs`.")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument("--learning_rate", type=float, default=defaults.get("learning_rate"))
    optim.add_argument("--scale_lr", action="store_true", help="Multiply the lr by batch size, accumulation, GPUs.")
    optim.add_argument(
        "--lr_scheduler",
        type=str,
        default="constant",
        help='"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial".',
    )
    optim.add_argument("--lr_warmup_steps", type=int, default=0)
    optim.add_argument("--lr_num_cycles", type=int, default=1)
    optim.add_argument("--lr_power", type=float, default=1.0)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=defaults.get("adam_beta2", 0.999))
    optim.add_argument("--adam_weight_decay", type=float, default=0.0)
    optim.add_argument("--adam_epsilon", type=float, default=1e-8)
    optim.add_argument("--max_grad_norm", type=float, default=defaults["max_grad_norm"], help="0 turns clipping off.")
    optim.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Default: accelerate's."
    )
    optim.add_argument("--allow_tf32", action="store_true")
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
    add_switch(
        optim,
        "ema_warmup",
        False,
        "Ramp the EMA decay up as diffusers does, min(decay, (1 + n) / (10 + n)), instead of the official constant "
        "decay from the first step (use it for short runs from scratch).",
    )

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", type=str, default=defaults["output_dir"])
    run.add_argument("--overwrite_output_dir", action="store_true", help="Start over in a folder with an earlier run.")
    run.add_argument("--checkpointing_steps", type=int, default=5000)
    run.add_argument("--checkpoints_total_limit", type=int, default=None)
    run.add_argument("--resume_from_checkpoint", type=str, default=None, help='"latest", a checkpoint name or path.')
    run.add_argument("--validation_steps", type=int, default=None, help="Sample validation images every N steps.")
    run.add_argument("--validation_num_inference_steps", type=int, default=None, help="Default: the scheduler's.")
    run.add_argument("--validation_guidance_scale", type=float, default=None, help="Default: the scheduler's.")
    run.add_argument("--logging_dir", type=str, default="logs", help="Tracker logs, inside `--output_dir`.")
    run.add_argument("--report_to", type=str, default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    run.add_argument("--tracker_project_name", type=str, default=defaults["tracker_project_name"])
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", type=str, default=None)
    run.add_argument("--hub_token", type=str, default=None)
    return parser


def check_training_arguments(args: argparse.Namespace):
    """Flag combinations that cannot work, reported before anything loads."""
    if (args.train_data_dir is None) == (args.dataset_name is None):
        raise ValueError("Pass exactly one of `--train_data_dir` (a local folder) and `--dataset_name`.")
    if args.streaming and args.max_train_steps is None:
        raise ValueError("`--streaming` datasets have no length: pass `--max_train_steps`.")
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        raise ValueError("Pass at most one of `--resume_from_checkpoint` and `--overwrite_output_dir`.")
    positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_train_epochs")
    for name in positive + ("max_train_steps", "validation_steps", "checkpoints_total_limit", "resolution"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}.")
    if not 0.0 <= args.condition_dropout < 1.0:
        raise ValueError(f"`--condition_dropout` must be in [0, 1), got {args.condition_dropout}.")
    if args.shift is not None and not (math.isfinite(args.shift) and args.shift > 0):
        raise ValueError(f"`--shift` must be a positive number, got {args.shift}.")
    if args.ema_decay is not None and not 0.0 <= args.ema_decay <= 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1], got {args.ema_decay}.")
    if args.report_to == "wandb" and args.hub_token is not None:
        raise ValueError("`--report_to wandb` with `--hub_token` would expose the token; use `hf auth login` instead.")


# ---------------------------------------------------------------------------------------------------------- a run


def create_accelerator(args: argparse.Namespace):
    """The `Accelerator` (project folders, seedable data order, trackers), the logging set-up and the seed.

    Without a GPU it runs on the CPU (several processes then use gloo DDP); a launcher asking for more processes than
    the run really has (e.g. `--multi_gpu` on a machine Accelerate cannot use that way) is an error, not silent copies.
    """
    import datasets
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, broadcast_object_list, set_seed

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
    if accelerator.state.deepspeed_plugin is not None:  # DeepSpeed cannot read it from a dataloader prepared alone
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.train_batch_size
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # One seed for the run: given, stored in the checkpoint being resumed, or drawn once and shared by all processes.
    checkpoint = resolve_checkpoint(args.output_dir, args.resume_from_checkpoint)
    if args.seed is None and checkpoint is not None:
        args.seed = read_training_state(checkpoint)["seed"]
    if args.seed is None:
        seed = [int.from_bytes(os.urandom(4), "little")]
        if accelerator.num_processes > 1:
            broadcast_object_list(seed)
        args.seed = seed[0]
    accelerator.dataloader_config.data_seed = args.seed
    set_seed(args.seed)
    return accelerator


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


def prepare_output_dir(accelerator, args: argparse.Namespace) -> str | None:
    """Locks the folder, repairs interrupted saves, checks for an earlier run; returns the checkpoint to resume from
    (`None`: a new run). With `--overwrite_output_dir` the earlier checkpoints are only listed in
    `args.stale_checkpoints`: they are deleted once this run has committed its first checkpoint, so a run that fails
    to start loses nothing."""
    if args.push_to_hub:
        args.hub_repo_id = check_hub_access(args)
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
    args.stale_checkpoints = (
        [path for _, path in list_checkpoints(args.output_dir)] if args.overwrite_output_dir else []
    )
    if args.resume_from_checkpoint is not None and checkpoint is None:
        logger.info("No checkpoint in %s: starting a new run.", args.output_dir)
    accelerator.wait_for_everyone()
    return checkpoint


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def dataloader_workers(requested: int, num_processes: int = 1) -> int:
    """`--dataloader_num_workers`, capped by the CPUs this process may use shared by the processes of the run (more
    workers than cores only slow the training step down)."""
    if requested < 0:
        raise ValueError(f"`--dataloader_num_workers` must be >= 0, got {requested}.")
    cap = max(1, available_cpus() // num_processes)
    if requested > cap:
        logger.info(
            "Data loader workers: %d instead of %d (%d CPUs for %d processes).",
            cap,
            requested,
            available_cpus(),
            num_processes,
        )
    return min(requested, cap)


def create_dataloader(accelerator, args: argparse.Namespace, dataset):
    """A shuffled data loader of decoded samples; map-style data is sharded and seeded by Accelerate (so resuming can
    skip to the exact batch), streamed data is split between processes here."""
    from .training_data import ImageSampleDataset, StreamingImageSampleDataset, collate_samples

    num_workers = dataloader_workers(args.dataloader_num_workers, accelerator.num_processes)
    if args.streaming:
        from datasets.distributed import split_dataset_by_node

        dataset = dataset.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, accelerator.process_index, accelerator.num_processes)
        samples = StreamingImageSampleDataset(
            dataset, args.resolution, args.image_preprocessing, args.fail_on_corrupt_images
        )
        return torch.utils.data.DataLoader(
            samples,
            batch_size=args.train_batch_size,
            num_workers=num_workers,  # not persistent: each epoch's stream position is set in the main process
            collate_fn=collate_samples,
            drop_last=True,
        )
    samples = ImageSampleDataset(dataset, args.resolution, args.image_preprocessing, args.fail_on_corrupt_images)
    loader = torch.utils.data.DataLoader(
        samples,
        batch_size=args.train_batch_size,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,  # no new worker processes (and image decoders) every epoch
        collate_fn=collate_samples,
        drop_last=True,
    )
    loader = accelerator.prepare(loader)
    if len(loader) == 0:
        raise ValueError(
            f"The dataset has {len(samples)} images, fewer than one batch (`--train_batch_size` "
            f"{args.train_batch_size}) for each of the {accelerator.num_processes} processes."
        )
    return loader


def training_steps(args: argparse.Namespace, dataloader) -> tuple[int, int | None]:
    """`(max_train_steps, optimizer steps per epoch)`; the second is `None` for a streamed dataset."""
    if args.streaming:
        return args.max_train_steps, None
    steps_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch, steps_per_epoch


def create_optimizer(accelerator, args: argparse.Namespace, parameters: list, max_train_steps: int):
    """AdamW and the lr schedule (diffusers' `get_scheduler`, counted in the per-process steps Accelerate makes)."""
    from diffusers.optimization import get_scheduler

    learning_rate = args.learning_rate
    if args.scale_lr:
        learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        parameters,
        lr=learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    return optimizer, lr_scheduler


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


def model_config_from_args(args: argparse.Namespace, presets: dict, **overrides) -> dict:
    """A new transformer's arguments: the preset or JSON file `--model_config`, the inline JSON `--model_config_json`
    on top, then `overrides` (the training resolution, the data's classes, the text encoder's width)."""
    if args.model_config in presets:
        config = dict(presets[args.model_config])
    else:
        try:
            with open(args.model_config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"`--model_config` {args.model_config!r}: not a preset nor a JSON file ({error})."
            ) from None
    if args.model_config_json:
        try:
            config.update(json.loads(args.model_config_json))
        except json.JSONDecodeError as error:
            raise ValueError(f"`--model_config_json` is not valid JSON: {error}.") from None
    config.update(overrides)
    return config


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype of frozen modules under Accelerate's mixed precision."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def tracker_config(args: argparse.Namespace) -> dict:
    """The flags as tracker hyper-parameters (TensorBoard takes numbers, strings and booleans only)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


class TrainingRun:
    r"""
    Everything around the training step that the scripts share. Given the training module (not yet prepared) and the
    prepared data loader, it makes AdamW and the lr schedule, prepares them with Accelerate, creates the float32 EMA
    of the trained transformer weights, resumes from `checkpoint` (model, optimizer, lr schedule, grad scaler and RNG
    through `accelerator.load_state`; then EMA, step and data position), and starts the trackers. Then:

    ```py
    run = TrainingRun(accelerator, args, model, train_dataloader, checkpoint)
    for batch in run.batches():  # until --max_train_steps, epoch after epoch, resuming at the exact batch
        with accelerator.accumulate(run.model):
            inputs = run.step_inputs(batch["pixel_values"], repa_encoder)  # noise, sigmas, dropout, ...
            losses = run.model(**inputs, class_labels=batch["label"])
            run.backward(losses)  # stops on a non-finite loss; clipping, optimizer and lr steps
        if run.end_step(batch) and run.validation_due:  # EMA, logs, atomic checkpoints
            run.validation_images(pipeline, captions, class_labels=...)
    ```
    """

    def __init__(self, accelerator, args, model: PixNerdTrainingModule, dataloader, checkpoint: str | None = None):
        from tqdm.auto import tqdm

        self.accelerator, self.args, self.dataloader = accelerator, args, dataloader
        self.max_train_steps, self.steps_per_epoch = training_steps(args, dataloader)
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer, lr_scheduler = create_optimizer(accelerator, args, parameters, self.max_train_steps)
        self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
        self.trained: PixNerdTrainingModule = accelerator.unwrap_model(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # The EMA follows the trained transformer weights (not the projector, nor text encoder layers).
        self.ema_parameters = [p for p in self.trained.transformer.parameters() if p.requires_grad]
        if args.use_ema and args.ema_decay is None:
            args.ema_decay = ema_decay_for_run(self.max_train_steps)
            logger.info(
                "EMA decay %.6g, chosen from the run length (%d steps): the export averages about the last %d steps.",
                args.ema_decay,
                self.max_train_steps,
                round(1 / max(1 - args.ema_decay, 1e-12)),
            )
        self.ema = create_ema(self.ema_parameters, args.ema_decay, args.ema_warmup) if args.use_ema else None
        initial_share = 0.0 if args.ema_warmup else (args.ema_decay or 0.0) ** self.max_train_steps
        if self.ema is not None and checkpoint is None and initial_share > EMA_MAX_INITIAL_SHARE:
            logger.warning(
                "With the constant EMA decay %g, the starting weights (the base model when fine-tuning, the random "
                "initialisation from scratch) still make up %.0f%% of the exported EMA after %d steps, so the export "
                "stays close to them. Leave `--ema_decay` unset to choose it from the run length, or pass "
                "`--ema_warmup` or `--no_use_ema`.",
                args.ema_decay,
                100 * initial_share,
                self.max_train_steps,
            )
        self.global_step, self.first_epoch, self.resume_batches = 0, 0, 0
        self.saved_step, self.stop_signal, self.stopped_by = None, None, None
        self.skipped_images = torch.zeros((), device=accelerator.device)
        self.logs: dict[str, float] = {}
        self._sums: dict[str, float] = {}
        if checkpoint is not None:
            self.load(checkpoint)
            self.saved_step = self.global_step
            if self.global_step >= self.max_train_steps:
                logger.warning(
                    "%s is at step %d, already `--max_train_steps` (%d): nothing to train; exporting it again. Pass "
                    "a higher `--max_train_steps` to continue.",
                    checkpoint,
                    self.global_step,
                    self.max_train_steps,
                )
        self._install_signal_handlers()
        self.micro_step = self.global_step * args.gradient_accumulation_steps
        if accelerator.is_main_process and args.report_to != "none":
            accelerator.init_trackers(args.tracker_project_name, config=tracker_config(args))
        self.images_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info(
            "***** Training: %s steps, batch %d (x %d processes x %d accumulation = %d), %.2fM trainable parameters, "
            "from step %d *****",
            self.max_train_steps,
            args.train_batch_size,
            accelerator.num_processes,
            args.gradient_accumulation_steps,
            self.images_per_step,
            sum(p.numel() for p in parameters) / 1e6,
            self.global_step,
        )
        self.progress = tqdm(
            total=self.max_train_steps,
            initial=self.global_step,
            desc="Steps",
            disable=not accelerator.is_local_main_process,
        )
        self._last_time = time.perf_counter()

    # ---- data
    def batches(self) -> Iterator[dict]:
        """Batches until `max_train_steps`, epoch after epoch, starting where the resumed checkpoint stopped."""
        epoch = self.first_epoch
        while self.global_step < self.max_train_steps:
            loader = self.dataloader
            if self.args.streaming:
                loader.dataset.set_epoch(epoch)
                if epoch == self.first_epoch and self.resume_batches:
                    import itertools

                    loader = itertools.islice(loader, self.resume_batches, None)  # streams cannot seek: read past
            else:
                if epoch == self.first_epoch and self.resume_batches:
                    loader = self.accelerator.skip_first_batches(loader, self.resume_batches)
                loader.set_epoch(epoch)
            empty = True
            for batch in loader:
                empty = False
                if self.args.streaming:
                    batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                yield batch
                if self.global_step >= self.max_train_steps or self.stopped_by is not None:
                    return
            if empty and not (epoch == self.first_epoch and self.resume_batches):
                raise RuntimeError(
                    f"Process {self.accelerator.process_index} got no batch in epoch {epoch}: too "
                    "little data (or too few dataset shards) for the processes and the batch size."
                )
            epoch += 1

    def generator(self) -> torch.Generator:
        """The random source of this micro-batch (noise, timesteps, dropout, flips): seeded by (seed, process, batch
        number), so a resumed run draws exactly what the uninterrupted one would have drawn."""
        device = self.accelerator.device
        seed = ((self.args.seed * 1_000_003 + self.accelerator.process_index) * 1_000_003 + self.micro_step) % 2**63
        return torch.Generator(device).manual_seed(seed)

    # ---- the step
    def step_inputs(self, pixels: torch.Tensor, repa_encoder: nn.Module | None = None) -> dict:
        """The random part of a step, from `generator()`: optional flips, noise, sigmas (sampled and shifted), the
        condition-dropout mask; plus the REPA targets of the (flipped) clean images on the transformer's token grid."""
        args, generator = self.args, self.generator()
        if args.random_flip:
            pixels = random_flip(pixels, generator)
        batch_size, device = pixels.shape[0], pixels.device
        noise = torch.randn(pixels.shape, generator=generator, device=generator.device).to(device, pixels.dtype)
        sigmas = sample_sigmas(
            batch_size,
            args.timestep_sampling,
            args.shift,
            args.logit_mean,
            args.logit_std,
            args.mode_scale,
            generator=generator,
            device=generator.device,
        ).to(device)
        drop_mask = condition_drop_mask(batch_size, args.condition_dropout, generator).to(device)
        inputs = {"pixels": pixels, "noise": noise, "sigmas": sigmas, "drop_mask": drop_mask}
        if repa_encoder is not None:
            token_grid = self.trained.transformer.token_grid(*pixels.shape[-2:])[:2]  # the text model's is fixed
            with self.accelerator.autocast():
                inputs["repa_features"] = repa_target_features(repa_encoder, pixels, token_grid)
        return inputs

    def backward(self, losses: dict):
        """Stops on a non-finite loss (any process), then backward, clipping, optimizer and lr steps."""
        accelerator = self.accelerator
        values = accelerator.gather(torch.stack([v.detach().float() for v in losses.values()])[None])
        if not torch.isfinite(values).all():
            self._restore_signal_handlers()
            latest = list_checkpoints(self.args.output_dir)
            raise FloatingPointError(
                f"Non-finite loss at step {self.global_step + 1} ({dict(zip(losses, values.T.tolist()))}): stopping "
                f"without saving. The last good checkpoint is {latest[-1][1] if latest else 'none (no checkpoint yet)'}"
                "; resume from it with `--resume_from_checkpoint latest`, e.g. with a lower `--learning_rate` or "
                "`--max_grad_norm 1.0`."
            )
        for name, value in zip(losses, values.mean(0).tolist()):
            self._sums[name] = self._sums.get(name, 0.0) + value / self.args.gradient_accumulation_steps
        accelerator.backward(losses["loss"])
        if accelerator.sync_gradients and self.args.max_grad_norm > 0:
            accelerator.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def end_step(self, batch: dict) -> bool:
        """After each micro-batch: on an optimizer step, EMA, logs and checkpoints. Returns whether a step ended."""
        self.micro_step += 1
        self.skipped_images += batch.get("num_skipped", 0)
        if not self.accelerator.sync_gradients:
            return False
        if self.ema is not None:
            self.ema.step(self.ema_parameters)
        self.global_step += 1
        if self.global_step == 1:
            self.check_replicas()
        self.log()
        if self.global_step % self.args.checkpointing_steps == 0 or self.global_step == self.max_train_steps:
            self.save()  # the last step is always checkpointed: a finished run can be continued
        if self._stop_requested():
            if self.saved_step != self.global_step:
                self.save()
            self.stopped_by = self.stop_signal or signal.SIGTERM
        return True

    @property
    def validation_due(self) -> bool:
        steps = self.args.validation_steps
        return steps is not None and self.global_step % steps == 0

    def log(self):
        now = time.perf_counter()
        skipped = int(self.accelerator.reduce(self.skipped_images, reduction="sum").item())
        logs = {
            **self._sums,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "images_per_second": self.images_per_step / max(now - self._last_time, 1e-9),
        }
        if skipped:
            logs["skipped_images"] = skipped
        if skipped > self.logs.get("skipped_images", 0) and self.accelerator.is_main_process:
            logger.warning("Unreadable images skipped so far: %d (see the warnings above for their paths)", skipped)
        self._last_time, self._sums, self.logs = now, {}, logs
        self.progress.update(1)
        self.progress.set_postfix(
            loss=f"{logs['loss']:.4f}", lr=f"{logs['lr']:.2e}", img_s=f"{logs['images_per_second']:.1f}"
        )
        self.accelerator.log(logs, step=self.global_step)

    def check_replicas(self):
        """After the first step of a replicated run (DDP, DeepSpeed ZeRO-2) every process must hold the same weights."""
        from accelerate.utils import DistributedType, gather_object

        if self.accelerator.num_processes == 1 or self.accelerator.distributed_type == DistributedType.FSDP:
            return
        fingerprints = gather_object([parameters_fingerprint(self.trainable)])
        if len(set(fingerprints)) != 1:
            raise RuntimeError(f"The processes hold different weights after a step: {fingerprints}.")
        logger.info(
            "World size %d: all processes hold identical weights after step 1 (%s)",
            self.accelerator.num_processes,
            fingerprints[0],
        )

    # ---- checkpoints
    def _ema_file(self) -> str | None:
        from accelerate.utils import DistributedType

        if self.ema is None:
            return None
        if self.accelerator.distributed_type == DistributedType.FSDP:  # sharded weights: one EMA shard per process
            return f"ema-rank{self.accelerator.process_index}.pt"
        return EMA_FILE if self.accelerator.is_main_process else None

    def save(self) -> str:
        """`checkpoint-N.tmp` written by every process, then renamed by the main one: never a half-written "latest"."""
        accelerator, args = self.accelerator, self.args
        temporary = os.path.join(args.output_dir, f"{CHECKPOINT_PREFIX}{self.global_step}{TMP_SUFFIX}")
        if accelerator.is_main_process and os.path.exists(temporary):
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        final = temporary[: -len(TMP_SUFFIX)]
        try:
            accelerator.save_state(temporary)
            ema_file = self._ema_file()
            if ema_file is not None:
                torch.save(self.ema.state_dict(), os.path.join(temporary, ema_file))
            if accelerator.is_main_process:
                state = {
                    "global_step": self.global_step,
                    "seed": args.seed,
                    "num_processes": accelerator.num_processes,
                    "train_batch_size": args.train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "steps_per_epoch": self.steps_per_epoch,
                }
                with open(os.path.join(temporary, TRAINING_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(state, f, indent=2)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                commit_checkpoint(temporary, args.checkpoints_total_limit, getattr(args, "stale_checkpoints", ()))
                args.stale_checkpoints = []
                logger.info("Saved %s", final)
        except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
            if not (getattr(error, "errno", None) == errno.ENOSPC or "No space left" in str(error)):
                raise
            shutil.rmtree(temporary, ignore_errors=True)
            self._restore_signal_handlers()
            latest = list_checkpoints(args.output_dir)
            raise OSError(
                errno.ENOSPC,
                f"The disk is full: could not write {final} ({str(error).splitlines()[0]}). The last complete "
                f"checkpoint, {latest[-1][1] if latest else 'none yet'}, is intact: free some space and resume with "
                "`--resume_from_checkpoint latest`.",
            ) from None
        accelerator.wait_for_everyone()
        self.saved_step = self.global_step
        return final

    def load(self, checkpoint: str):
        """Model, optimizer, lr scheduler, grad scaler, RNG (Accelerate), then EMA, step and data position."""
        state = read_training_state(checkpoint)
        logger.info("Resuming from %s (step %d)", checkpoint, state["global_step"])
        self.accelerator.load_state(checkpoint)
        ema_file = self._ema_file() or (EMA_FILE if self.ema is not None else None)
        if ema_file is not None and os.path.exists(os.path.join(checkpoint, ema_file)):
            ema_state = torch.load(os.path.join(checkpoint, ema_file), map_location="cpu", weights_only=True)
            self.ema.load_state_dict(ema_state)
            self.ema.to(self.accelerator.device, dtype=torch.float32)
        elif ema_file is not None:
            logger.warning("%s has no EMA (trained without it): the EMA starts from its weights.", checkpoint)
            self.ema = create_ema(self.ema_parameters, self.args.ema_decay, self.args.ema_warmup)
        self.global_step = state["global_step"]
        same = (state["num_processes"], state["train_batch_size"], state["gradient_accumulation_steps"]) == (
            self.accelerator.num_processes,
            self.args.train_batch_size,
            self.args.gradient_accumulation_steps,
        )
        if not same or state["steps_per_epoch"] != self.steps_per_epoch:
            logger.warning(
                "The batch layout or the dataset changed since %s: the data order does not continue exactly.",
                checkpoint,
            )
        if self.steps_per_epoch is None:
            self.first_epoch, steps_in_epoch = 0, self.global_step
        else:
            self.first_epoch, steps_in_epoch = divmod(self.global_step, self.steps_per_epoch)
        self.resume_batches = steps_in_epoch * self.args.gradient_accumulation_steps

    def finish(self):
        """After the loop: closes the progress bar; after a SIGINT/SIGTERM, says how to resume and exits (no export)."""
        self.progress.close()
        self.accelerator.wait_for_everyone()
        self._restore_signal_handlers()
        if self.stopped_by is not None:
            name = signal.Signals(self.stopped_by).name
            if self.accelerator.is_main_process:
                checkpoint = os.path.join(self.args.output_dir, f"{CHECKPOINT_PREFIX}{self.saved_step}")
                logger.warning(
                    "Stopped by %s after step %d; the last checkpoint is %s. Resume with:\n  %s",
                    name,
                    self.global_step,
                    checkpoint,
                    resume_command(),
                )
            unlock_output_dir(self.args.output_dir)
            raise SystemExit(128 + int(self.stopped_by))
        if self.global_step >= self.max_train_steps and self.accelerator.is_main_process:
            logger.info("Training done at step %d; the last checkpoint holds it.", self.global_step)

    # ---- stopping on a signal
    def _install_signal_handlers(self):
        """SIGINT (Ctrl-C) and SIGTERM end the run after the current step, with a checkpoint; a second SIGINT stops at
        once. Only in the main thread (signal handlers cannot be set elsewhere)."""
        import threading

        self._previous_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return

        def request_stop(signum, frame):
            self.stop_signal = signum
            signal.signal(signal.SIGINT, self._previous_handlers.get(signal.SIGINT, signal.default_int_handler))
            if self.accelerator.is_local_main_process:
                logger.warning(
                    "%s received: stopping after this step with a checkpoint (Ctrl-C again to stop at once).",
                    signal.Signals(signum).name,
                )

        for signum in (signal.SIGINT, signal.SIGTERM):
            previous = signal.signal(signum, request_stop)
            # A run in this process that died by an exception left its handler: put back the one from before it.
            previous = getattr(previous, "previous_handlers", {}).get(signum, previous)
            self._previous_handlers[signum] = previous
        request_stop.previous_handlers = self._previous_handlers

    def _restore_signal_handlers(self):
        for signum, handler in getattr(self, "_previous_handlers", {}).items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def _stop_requested(self) -> bool:
        """Whether any process got a stop signal (all processes stop at the same step)."""
        flag = self.stop_signal or 0
        if self.accelerator.num_processes > 1:
            flag = int(self.accelerator.reduce(torch.tensor(flag, device=self.accelerator.device), "max").item())
            self.stop_signal = self.stop_signal or (flag or None)
        return bool(flag)

    # ---- validation and export
    def validation_images(self, pipeline, captions: list[str], final: bool = False, **call_kwargs) -> list[str]:
        """Samples with `pipeline` (EMA weights swapped in, fixed seed) on every process (FSDP needs all of them),
        saves them under `validation/step-<step>/` (`validation/final/` for the exported model) and logs them on the
        main one; returns their paths there."""
        args = self.args
        transformer = pipeline.transformer
        transformer.eval()
        pipeline.set_progress_bar_config(disable=True)
        if args.validation_num_inference_steps is not None:
            call_kwargs["num_inference_steps"] = args.validation_num_inference_steps
        if args.validation_guidance_scale is not None:
            call_kwargs["guidance_scale"] = args.validation_guidance_scale
        generator = torch.Generator().manual_seed(args.seed)
        with ema_weights(self.ema, self.ema_parameters), self.accelerator.autocast(), torch.no_grad():
            images = pipeline(generator=generator, **call_kwargs).images
        transformer.train()
        folder = os.path.join(args.output_dir, "validation", "final" if final else f"step-{self.global_step}")
        return log_validation(self.accelerator, images, captions, self.global_step, folder)

    def export_state(self) -> dict[str, torch.Tensor]:
        """The full state of the training module with the EMA weights in place, copied to the CPU of the main process
        (empty on the others). Every process must call it: FSDP gathers the shards."""
        with ema_weights(self.ema, self.ema_parameters):
            state = self.accelerator.get_state_dict(self.model)
            if not self.accelerator.is_main_process:
                return {}
            return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def exported_transformer(self, state: dict[str, torch.Tensor]):
        """A fresh transformer (same config) holding the exported weights: no projector, no PEFT wrappers."""
        config = self.trained.transformer.config
        transformer = type(self.trained.transformer).from_config(config)
        transformer.load_state_dict(sub_state_dict(state, "transformer"))
        return transformer

    def model_card(self, script: str, sample_paths: list[str]) -> str:
        """Markdown for the model card: how it was trained (the main settings) and the final validation samples."""
        return model_card_training_section(self.args, script, self.global_step, sample_paths)


# ------------------------------------------------------------------------------------------ validation and export


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of submodule `prefix`, without the prefix."""
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


def log_validation(accelerator, images: list, captions: list[str], step: int, folder: str) -> list[str]:
    """Saves validation images in `folder` and logs them to TensorBoard / W&B; returns the file paths (main process)."""
    import numpy as np

    if not accelerator.is_main_process:
        return []
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (image, caption) in enumerate(zip(images, captions)):
        slug = "".join(c if c.isalnum() else "_" for c in caption)[:40].strip("_")
        paths.append(os.path.join(folder, f"{i:02d}_{slug}.png"))
        image.save(paths[-1])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            stacked = np.stack([np.asarray(image) for image in images])
            tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=c) for im, c in zip(images, captions)]}, step=step)
    return paths


# The settings a model card lists, each with the condition under which it was used.
MODEL_CARD_SETTINGS = {
    "pretrained_model_name_or_path": None,
    "model_config": None,
    "text_encoder_name_or_path": lambda a: a.model_config is not None,
    "dataset_name": None,
    "train_data_dir": None,
    "resolution": None,
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
