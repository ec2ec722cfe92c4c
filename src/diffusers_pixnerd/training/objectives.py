# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The training objective of PixNerd: the rectified-flow loss with REPA, timestep sampling, condition dropout, flips,
and the training module that computes the losses of a step (`PixNerdTrainingModule`).

The recipe is the official one (`src/diffusion/flow_matching/training_repa.py`, `configs_c2i/`, `configs_t2i/`), in
diffusers' convention: `x_t = (1 - sigma) x0 + sigma noise`; the model predicts `noise - x0` from `timestep = 1000
sigma`.
"""

import dataclasses
import math
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ..models.transformer_pixnerd import NUM_TRAIN_TIMESTEPS
from ..pipelines.pipeline_pixnerd_t2i import encode_qwen3_prompts
from ..schedulers.scheduling_pixnerd import PixNerdFlowMatchScheduler, shift_sigmas
from .lora import adapters_disabled

TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
# ImageNet normalisation of DINOv2's inputs (timm's IMAGENET_DEFAULT_MEAN / STD, as in the official encoder.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------- timesteps and the loss


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
    model_output: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "none",
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error on the velocity, in float32, weighted per sample ("none" is the official constant weight).
    With a `loss_mask` (B, 1, H, W) in [0, 1] (1 = learn), each image's error is its mask-weighted mean, so that an
    image counts as much whatever the area it learns from (an all-zero mask: nothing), then averaged over the batch."""
    weights = compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float()).reshape(-1, 1, 1, 1)
    error = weights * (model_output.float() - target.float()) ** 2
    if loss_mask is None:
        return error.mean()
    mask = loss_mask.float().expand_as(error)
    return ((error * mask).sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp_min(1e-8)).mean()


def prior_preservation_losses(
    model_output: torch.Tensor,
    target: torch.Tensor,
    sigmas: torch.Tensor,
    weighting_scheme: str = "none",
    reg_samples: int = 0,
    reg_loss_weight: float = 1.0,
    loss_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """`{"loss", "fm_loss"}` of a batch whose last `reg_samples` rows are regularisation images: then `fm_loss` is the
    flow-matching loss of the other rows, `reg_loss` that of those, and `loss = fm_loss + reg_loss_weight * reg_loss`
    (DreamBooth's prior preservation: two means, so the weight does not depend on how many rows each part has).
    `loss_mask` weights the pixels of the other rows (see `flow_matching_loss`); regularisation rows learn whole."""
    if not reg_samples:
        fm_loss = flow_matching_loss(model_output, target, sigmas, weighting_scheme, loss_mask)
        return {"loss": fm_loss, "fm_loss": fm_loss}
    n = len(model_output) - reg_samples
    mask = None if loss_mask is None else loss_mask[:n]
    fm_loss = flow_matching_loss(model_output[:n], target[:n], sigmas[:n], weighting_scheme, mask)
    reg_loss = flow_matching_loss(model_output[n:], target[n:], sigmas[n:], weighting_scheme)
    return {"loss": fm_loss + reg_loss_weight * reg_loss, "fm_loss": fm_loss, "reg_loss": reg_loss}


def condition_drop_mask(batch_size: int, probability: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which samples train unconditionally (null class / empty prompt), for classifier-free guidance (official 0.1)."""
    device = generator.device if generator is not None else "cpu"
    return torch.rand(batch_size, generator=generator, device=device) < probability


def random_flip(pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flips each image horizontally with probability 1/2 (drawn from `generator`, so a resumed run flips the same)."""
    device = generator.device if generator is not None else pixels.device
    flip = (torch.rand(pixels.shape[0], generator=generator, device=device) < 0.5).to(pixels.device)
    return torch.where(flip.reshape(-1, 1, 1, 1), pixels.flip(-1), pixels)


def flip_images(pixels: torch.Tensor, generator: torch.Generator, loss_mask: torch.Tensor | None = None) -> tuple:
    """`(pixels, loss_mask)` after `random_flip`: each mask flipped with its image (the first `len(loss_mask)` rows;
    the same draws as the images alone)."""
    if loss_mask is None:
        return random_flip(pixels, generator), None
    n = len(loss_mask)
    rows = torch.cat([pixels[:n], loss_mask.to(pixels.dtype)], 1)
    flipped = random_flip(torch.cat([rows, F.pad(pixels[n:], (0, 0, 0, 0, 0, 1))]), generator)
    return flipped[:, :-1], flipped[:n, -1:]


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


def repa_encoder_grid(image_size: tuple[int, int], token_grid: tuple[int, int]) -> tuple[int, int]:
    """DINOv2's patch grid for an image of `image_size` (height, width): the token grid when it has the image's aspect
    ratio (the C2I model, square T2I images), else about as many patches in the image's aspect ratio (the T2I model
    keeps its square grid on non-square images; resizing the image to it would show DINOv2 a distorted image)."""
    (height, width), (grid_h, grid_w) = image_size, token_grid
    if height * grid_w == width * grid_h:
        return grid_h, grid_w
    tokens = grid_h * grid_w
    return max(1, round(math.sqrt(tokens * height / width))), max(1, round(math.sqrt(tokens * width / height)))


@torch.no_grad()
def repa_target_features(encoder: nn.Module, pixels: torch.Tensor, token_grid: tuple[int, int]) -> torch.Tensor:
    """DINOv2 patch features (B, N, C) of clean images in [-1, 1] on the PixNerd token grid: ImageNet-normalised and
    resized (bicubic) to `encoder patch size x repa_encoder_grid(...)`, so that DINOv2's patch grid is the token grid
    (the official `encoder.py` resizes to 14 H / 16); on a grid of another aspect ratio (the T2I model's fixed grid, a
    non-square image) the features of the undistorted image are resampled to it (bilinear, antialiased)."""
    encoder_patch = encoder.config.patch_size
    grid = repa_encoder_grid(tuple(pixels.shape[-2:]), tuple(token_grid))
    x = (pixels.float() + 1) / 2
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, 3, 1, 1)
    x = (x - mean) / std
    x = F.interpolate(x, (encoder_patch * grid[0], encoder_patch * grid[1]), mode="bicubic")
    hidden = encoder(pixel_values=x.to(encoder.dtype)).last_hidden_state
    num_prefix = 1 + getattr(encoder.config, "num_register_tokens", 0)  # CLS (+ registers)
    features = hidden[:, num_prefix:]  # (B, grid_h * grid_w, C)
    if grid != tuple(token_grid):
        maps = features.transpose(1, 2).unflatten(2, grid).float()  # (B, C, grid_h, grid_w)
        maps = F.interpolate(maps, tuple(token_grid), mode="bilinear", antialias=True)
        features = maps.flatten(2).transpose(1, 2).to(features.dtype)
    return features


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
        output_preservation_weight (`float`, defaults to 0): the weight of `output_preservation_loss` (LoRA only).
        text_preservation_weight (`float`, defaults to 0): the weight of `text_preservation_loss` (a text encoder with
            LoRA adapters).
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
        output_preservation_weight: float = 0.0,
        text_preservation_weight: float = 0.0,
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
        self.output_preservation_weight = output_preservation_weight
        self.text_preservation_weight = text_preservation_weight
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
            embeds = self.encode([*prompts, ""], drop_mask.device)
            encoder_hidden_states, null = embeds[:-1], embeds[-1:]
        else:
            null = self.null_encoder_hidden_states
        null = null.to(encoder_hidden_states.dtype)
        return {"encoder_hidden_states": torch.where(drop_mask.reshape(-1, 1, 1), null, encoder_hidden_states)}

    def encode(self, prompts: list[str], device) -> torch.Tensor:
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, self.transformer.config, device)

    def output_preservation_loss(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
        rows: torch.Tensor,
        prompts: list[str] | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The MSE between what the model predicts for the `rows` of `noisy` under their captions without the concept
        word (`prompts`, or their embeddings from a frozen encoder) and what the base model predicts there (every LoRA
        adapter of the transformer and the text encoder switched off, no gradient); 0 when no row holds the word."""
        index = rows.to(noisy.device).nonzero()[:, 0]
        if not len(index):
            return noisy.new_zeros((), dtype=torch.float32)
        noisy, timesteps, sigmas = noisy[index], timesteps[index], sigmas[index]
        if prompts is not None:
            prompts = [prompts[i] for i in index.tolist()]
        else:
            encoder_hidden_states = encoder_hidden_states[index.to(encoder_hidden_states.device)]
        with torch.no_grad(), adapters_disabled(self.transformer, self.text_encoder):
            states = encoder_hidden_states if prompts is None else self.encode(prompts, noisy.device)
            target = self.transformer(noisy, timesteps, encoder_hidden_states=states).sample
        states = encoder_hidden_states if prompts is None else self.encode(prompts, noisy.device)
        output = self.transformer(noisy, timesteps, encoder_hidden_states=states).sample
        return flow_matching_loss(output, target, sigmas, self.weighting_scheme)

    def text_preservation_loss(self, prompts: list[str], device) -> torch.Tensor:
        """How far the text encoder's output on `prompts` is from the base encoder's (its LoRA adapters switched off):
        the squared error relative to the base output's squared norm, so the weight does not depend on the encoder's
        scale."""
        with torch.no_grad(), adapters_disabled(self.text_encoder):
            target = self.encode(prompts, device).float()
        output = self.encode(prompts, device).float()
        return (output - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)

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
        reg_samples: int = 0,
        reg_loss_weight: float = 1.0,
        loss_mask: torch.Tensor | None = None,
        preservation_rows: torch.Tensor | None = None,
        preservation_prompts: list[str] | None = None,
        preservation_encoder_hidden_states: torch.Tensor | None = None,
        text_preservation_prompts: list[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses `{"loss", "fm_loss"[, "reg_loss"][, "preservation_loss"][, "repa_loss"]}` of clean `pixels` in [-1, 1]
        at noise levels `sigmas`; the last `reg_samples` rows are regularisation images (`training/prior.py`): their
        loss is `reg_loss`, added with the weight `reg_loss_weight`. `loss_mask` (B', 1, H, W), one per row before the
        regularisation rows, weights the flow-matching loss per pixel (`--mask_data_dir`, `--alpha_mask`). With
        `preservation_rows` (bool, one per row from the first, the regularisation rows optional) and the captions of
        those rows without the concept word (`preservation_prompts`, or their embeddings), `output_preservation_loss`
        is added with the module's `output_preservation_weight`; with `text_preservation_prompts`,
        `text_preservation_loss` with `text_preservation_weight`."""
        condition = self.conditions(drop_mask, class_labels, encoder_hidden_states, prompts)
        timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        noisy = self.noise_scheduler.add_noise(pixels, noise, timesteps)
        repa = self.projector is not None
        with capture_block_output(self.transformer, self.align_layer) if repa else nullcontext() as hidden:
            model_output = self.transformer(noisy, timesteps, **condition).sample
        losses = prior_preservation_losses(
            model_output, noise - pixels, sigmas, self.weighting_scheme, reg_samples, reg_loss_weight, loss_mask
        )
        if preservation_rows is not None:
            losses["preservation_loss"] = self.output_preservation_loss(
                noisy, timesteps, sigmas, preservation_rows, preservation_prompts, preservation_encoder_hidden_states
            )
            losses["loss"] = losses["loss"] + self.output_preservation_weight * losses["preservation_loss"]
        if text_preservation_prompts is not None:
            losses["text_preservation_loss"] = self.text_preservation_loss(text_preservation_prompts, pixels.device)
            losses["loss"] = losses["loss"] + self.text_preservation_weight * losses["text_preservation_loss"]
        if self.projector is not None:
            losses["repa_loss"] = repa_cosine_loss(self.projector(hidden[0]), repa_features)
            losses["loss"] = losses["loss"] + self.repa_loss_weight * losses["repa_loss"]
        return losses


@dataclasses.dataclass(frozen=True)
class StepSampling:
    """How `TrainingRun.step_inputs` draws a step's random inputs (the training flags of the same names)."""

    timestep_sampling: str
    shift: float
    logit_mean: float
    logit_std: float
    mode_scale: float
    condition_dropout: float
    random_flip: bool

    @classmethod
    def from_args(cls, args) -> "StepSampling":
        """From the training flags of the same names."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})
