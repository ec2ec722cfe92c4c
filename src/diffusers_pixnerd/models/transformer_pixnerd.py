# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""PixNerd: a pixel-space diffusion transformer whose output head is a per-patch neural field.

Paper: "PixNerd: Pixel Neural Field Diffusion" (ICLR 2026), https://arxiv.org/abs/2507.23268.
Reference implementation: github MCG-NJU/PixNerd (`src/models/transformer/pixnerd_c2i.py` and
`pixnerd_t2i_heavydecoder.py`). Weights converted from the official checkpoints reproduce its outputs.
"""

import math
import os
import re
from typing import Any

import diffusers
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin
from diffusers.models.cache_utils import CacheMixin
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import RMSNorm
from diffusers.utils import apply_lora_scale

from ..loaders.official_checkpoint import FromOfficialCheckpointMixin
from ..loaders.official_repo import check_local_path
from ..utils import is_integer, is_real
from .cache import check_cache_config, separate_cache_contexts
from .pixnerd_blocks import (  # noqa: F401 - `apply_rope`, `rope_angles`, the processor: imported from here too
    NeuralFieldBlock,
    PixNerdAttention,
    PixNerdAttnProcessor,
    PixNerdNeuralField,
    PixNerdTransformerBlock,
    SwiGLU,
    apply_rope,
    dct_features,
    modulate,
    patchify,
    rope_angles,
    unpatchify,
)

# Official sizes. `PixNerdTransformer2DModel.from_preset(name)` builds one (random weights) to train from scratch.
PIXNERD_PRESETS = {
    "PixNerd-L/16": dict(
        num_layers=22, num_attention_heads=16, attention_head_dim=64, num_neural_field_layers=2, num_classes=1000
    ),
    "PixNerd-XL/16": dict(
        num_layers=26, num_attention_heads=16, attention_head_dim=72, num_neural_field_layers=4, num_classes=1000
    ),
    "PixNerd-XXL/16-T2I": dict(
        num_layers=16,
        num_attention_heads=24,
        attention_head_dim=64,
        num_neural_field_layers=2,
        num_classes=None,
        text_embed_dim=2048,
        text_max_length=128,
        num_text_refiner_layers=4,
        sample_size=512,
    ),
}

# Config entries that count numbered blocks -> the modules they number (checked against the weights on loading).
BLOCK_COUNTS = {
    "num_layers": "transformer_blocks",
    "num_neural_field_layers": "neural_field.blocks",
    "num_text_refiner_layers": "text_refiner_blocks",
}

# Official time runs the other way (t = 0 is noise): t = 1 - timestep / NUM_TRAIN_TIMESTEPS.
NUM_TRAIN_TIMESTEPS = 1000


def count_blocks(keys, prefix: str) -> int:
    """The number of distinct block indices `i` in keys `{prefix}.{i}.*`."""
    return len({m.group(1) for k in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", k))})


def check_weights_fit_config(model: nn.Module, missing: list[str], unexpected: list[str], source: str) -> None:
    """Raises `ValueError` for weights that leave parameters of `model` unloaded, or whose block counts disagree with
    its config, naming `source` (the folder), the config entries and the keys."""
    if not missing and not any(count_blocks(unexpected, prefix) for prefix in BLOCK_COUNTS.values()):
        return
    built = model.state_dict().keys()
    weights = set(built) - set(missing) | set(unexpected)
    disagree = []
    for name, prefix in BLOCK_COUNTS.items():
        in_config, in_weights = count_blocks(built, prefix), count_blocks(weights, prefix)
        if in_config != in_weights:
            disagree.append(f"`{name}` is {in_config} in config.json but the weights hold {in_weights} blocks")
    found = "; ".join(disagree) or f"the weights lack {len(missing)} parameters, e.g. {sorted(missing)[:3]}"
    raise ValueError(
        f"The weights in {source} do not fit its config.json: {found}. Load the folder with the config it was "
        "saved with."
    )


class PixNerdTransformer2DModel(
    ModelMixin, ConfigMixin, AttentionMixin, CacheMixin, PeftAdapterMixin, FromOfficialCheckpointMixin
):
    r"""
    The PixNerd transformer: a pixel-space DiT with large patches whose final projection is a per-patch neural
    field ([paper](https://arxiv.org/abs/2507.23268)). One class serves both official variants: class-conditional
    (`num_classes` set) and text-conditional (`text_embed_dim` set, Qwen3 hidden states as `encoder_hidden_states`).

    The model works in diffusers' flow-matching convention: `timestep` is `sigma * 1000` (1000 = pure noise) and the
    output is the velocity `noise - x0`. The official code runs the other way (t = 1 - sigma, output `x0 - noise`); the
    conversion is done inside, so converted official weights give the official results.

    Parameters:
        sample_size (`int`, defaults to `256`):
            The trained resolution. Other resolutions can be decoded with the backbone on the `sample_size` token
            grid and a neural field that renders larger or smaller patches (official `app.py`): always in the text
            variant, with `trained_grid=True` in the class-conditional one (which by default runs other sizes on its
            native grid of `patch_size` patches, as the official class-conditional sampler does).
        patch_size (`int`, defaults to `16`):
            The side of the square patches of the backbone.
        in_channels (`int`, defaults to `3`):
            The number of pixel channels.
        num_layers (`int`, defaults to `26`):
            The number of DiT blocks.
        num_attention_heads (`int`, defaults to `16`):
            The number of attention heads.
        attention_head_dim (`int`, defaults to `72`):
            The channels per head; the hidden size is `num_attention_heads * attention_head_dim`.
        mlp_ratio (`float`, defaults to `4.0`):
            The SwiGLU width ratio. The class-conditional model keeps the official 2/3 factor
            (`int(2 * int(hidden * mlp_ratio) / 3)`); the text model uses `int(hidden * mlp_ratio)`.
        num_neural_field_layers (`int`, defaults to `4`):
            The number of layers of the per-patch MLP.
        neural_field_hidden_size (`int`, defaults to `64`):
            The width of the per-patch MLP.
        neural_field_mlp_ratio (`int`, defaults to `2`):
            The expansion ratio inside each neural-field layer.
        neural_field_max_freqs (`int`, defaults to `8`):
            The pixel position encoding has `neural_field_max_freqs**2` features.
        num_classes (`int`, *optional*, defaults to `1000`):
            The number of classes of the class-conditional model; label `num_classes` is the null class used for
            classifier-free guidance. `None` for the text model.
        text_embed_dim (`int`, *optional*, defaults to `None`):
            The width of the text encoder's hidden states (2048 for Qwen3-1.7B). Setting it makes a text model.
        text_max_length (`int`, defaults to `128`):
            The number of text tokens (the learned text position table has this length).
        num_text_refiner_layers (`int`, defaults to `4`):
            The number of self-attention blocks refining the text tokens.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PixNerdTransformerBlock", "PixNerdNeuralField"]
    # Kept in the compute dtype under layerwise casting: embeddings, norms and the neural field's pixel input/output
    # projections (tiny; in fp8 storage they alone raise the velocity error of the bundled model from 1% to 4%).
    _skip_layerwise_casting_patterns = [
        "patch_embed",
        "norm",
        "time_embedder",
        "class_embedder",
        "text_pos_embed",
        "neural_field.in_proj",
        "neural_field.proj_out",
    ]
    _repeated_blocks = ["PixNerdTransformerBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 256,
        patch_size: int = 16,
        in_channels: int = 3,
        num_layers: int = 26,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_neural_field_layers: int = 4,
        neural_field_hidden_size: int = 64,
        neural_field_mlp_ratio: int = 2,
        neural_field_max_freqs: int = 8,
        num_classes: int | None = 1000,
        text_embed_dim: int | None = None,
        text_max_length: int = 128,
        num_text_refiner_layers: int = 4,
    ):
        super().__init__()
        if (num_classes is None) == (text_embed_dim is None):
            raise ValueError(
                f"Exactly one of `num_classes` ({num_classes}) and `text_embed_dim` ({text_embed_dim}) must be set: "
                "it chooses the class-conditional or the text-to-image model."
            )
        positive = dict(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            num_neural_field_layers=num_neural_field_layers,
            neural_field_hidden_size=neural_field_hidden_size,
            neural_field_mlp_ratio=neural_field_mlp_ratio,
            neural_field_max_freqs=neural_field_max_freqs,
            num_classes=num_classes if num_classes is not None else 1,
            text_embed_dim=text_embed_dim if text_embed_dim is not None else 1,
            text_max_length=text_max_length,
        )
        for name, value in positive.items():
            if not (is_integer(value) and value >= 1):
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if not (is_integer(num_text_refiner_layers) and num_text_refiner_layers >= 0):
            raise ValueError(
                f"`num_text_refiner_layers` must be a non-negative integer, got {num_text_refiner_layers!r}."
            )
        if not (is_real(mlp_ratio) and math.isfinite(mlp_ratio) and mlp_ratio > 0):
            raise ValueError(f"`mlp_ratio` must be a positive number, got {mlp_ratio!r}.")
        if sample_size % patch_size:
            raise ValueError(f"`sample_size` ({sample_size}) must be a multiple of `patch_size` ({patch_size}).")
        dim = num_attention_heads * attention_head_dim
        is_text = text_embed_dim is not None
        if is_text and neural_field_max_freqs**2 % 2:
            raise ValueError(
                f"`neural_field_max_freqs` ({neural_field_max_freqs}) must be even for the text model: its pixel "
                "position features are x/y RoPE pairs."
            )
        if is_text:
            mlp_hidden_dim = int(dim * mlp_ratio)
        else:
            mlp_hidden_dim = int(2 * int(dim * mlp_ratio) / 3)  # the official FeedForward's 2/3 factor

        self.patch_embed = nn.Linear(in_channels * patch_size**2, dim)
        self.time_embedder = TimestepEmbedding(256, dim)
        if is_text:
            self.text_proj = nn.Linear(text_embed_dim, dim)
            self.text_norm = RMSNorm(dim, eps=1e-6)
            self.text_pos_embed = nn.Parameter(torch.randn(1, text_max_length, dim))
            self.text_refiner_blocks = nn.ModuleList(
                [
                    PixNerdTransformerBlock(dim, num_attention_heads, mlp_hidden_dim)
                    for _ in range(num_text_refiner_layers)
                ]
            )
        else:
            self.class_embedder = nn.Embedding(num_classes + 1, dim)  # + the null class
        self.transformer_blocks = nn.ModuleList(
            [
                PixNerdTransformerBlock(dim, num_attention_heads, mlp_hidden_dim, added_kv=is_text)
                for _ in range(num_layers)
            ]
        )
        self.neural_field = PixNerdNeuralField(
            in_channels,
            dim,
            neural_field_hidden_size,
            num_neural_field_layers,
            neural_field_mlp_ratio,
            neural_field_max_freqs,
            text_variant=is_text,
        )
        self.gradient_checkpointing = False
        self.initialize_weights()

    @classmethod
    def load_config(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`ConfigMixin.load_config`, refusing the config of another diffusers model (e.g. a UNet's config.json)."""
        loaded = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        class_name = config.get("_class_name")
        other = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
        if isinstance(other, type) and not issubclass(cls, other):  # a subclass of ours, unknown to diffusers, passes
            folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            file = os.path.join(folder, cls.config_name)
            raise ValueError(
                f"{file} is the config of a {class_name}, not of a {cls.__name__} (its `_class_name`): this folder "
                "does not hold a PixNerd transformer."
            )
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """`ModelMixin.from_pretrained`, with clear errors for a local path that does not exist and for weights that do
        not fit the config beside them (e.g. a `num_layers` other than the saved blocks)."""
        check_local_path(
            pretrained_model_name_or_path,
            os.path.join(kwargs.get("subfolder") or "", cls.config_name),
            kwargs.get("cache_dir"),
            kwargs.get("revision"),
            bool(kwargs.get("local_files_only")),
        )
        return_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        if info:  # FlashPack loading gives none
            folder = os.path.join(os.fspath(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            check_weights_fit_config(model, info["missing_keys"], info["unexpected_keys"], os.path.normpath(folder))
        return (model, info) if return_info else model

    def enable_cache(self, config) -> None:
        """diffusers' `CacheMixin.enable_cache`, with the DiT blocks registered for the block caches (FirstBlockCache,
        MagCache), one Pyramid Attention Broadcast state per cache context, and a clear error for the caches PixNerd
        cannot run (FasterCache, TextKVCache, SeaCache, TaylorSeer's lite mode). The pipelines give the conditional
        and unconditional branches their own cache context ("cond", "uncond") while a cache is enabled.
        """
        check_cache_config(PixNerdTransformerBlock, config)
        super().enable_cache(config)
        separate_cache_contexts(self, config)

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "PixNerdTransformer2DModel":
        """Builds an official size (`PIXNERD_PRESETS`) with fresh weights; `kwargs` override its config."""
        if name not in PIXNERD_PRESETS:
            raise ValueError(f"Unknown preset `name` {name!r}; expected one of {sorted(PIXNERD_PRESETS)}.")
        return cls(**{**PIXNERD_PRESETS[name], **kwargs})

    def initialize_weights(self):
        """The official initialisation, for training from scratch."""
        nn.init.xavier_uniform_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.time_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_embedder.linear_2.weight, std=0.02)
        if self.config.num_classes is not None:
            nn.init.normal_(self.class_embedder.weight, std=0.02)
        nn.init.zeros_(self.neural_field.proj_out.weight)
        nn.init.zeros_(self.neural_field.proj_out.bias)

    @property
    def is_text_conditional(self) -> bool:
        return self.config.text_embed_dim is not None

    @property
    def resolution_multiple(self) -> int:
        """Heights and widths the pipelines take by default are multiples of this (`size_multiple()`): the patch size
        for the class-conditional model, the patch size and the trained token grid for the text model."""
        return self.size_multiple()

    def size_multiple(self, trained_grid: bool | None = None) -> int:
        """The granularity of image sizes: the patch size on the native grid; on the trained grid
        (`uses_trained_grid(trained_grid)`) also a multiple of the trained grid's side, `sample_size / patch_size`."""
        p = self.config.patch_size
        return math.lcm(p, self.config.sample_size // p) if self.uses_trained_grid(trained_grid) else p

    def uses_trained_grid(self, trained_grid: bool | None = None) -> bool:
        """`trained_grid`, or by default whether the model always keeps its trained token grid (the text model)."""
        if trained_grid is not None and not isinstance(trained_grid, bool):
            raise ValueError(f"`trained_grid` must be True, False or None, got {trained_grid!r}.")
        return self.is_text_conditional if trained_grid is None else trained_grid

    def token_grid(self, height: int, width: int, trained_grid: bool | None = None) -> tuple[int, int, int, int]:
        """(grid_h, grid_w, patch_h, patch_w): the backbone's token grid and the neural-field patch for an input size.

        On the trained grid (`uses_trained_grid(trained_grid)`) the backbone keeps `sample_size / patch_size` tokens
        per side at any size and each token's neural field decodes a larger or smaller patch (official app.py);
        otherwise the grid follows the image in `patch_size` patches (the official class-conditional forward).
        """
        p, size = self.config.patch_size, self.config.sample_size
        if not self.uses_trained_grid(trained_grid) or (height, width) == (size, size):
            return height // p, width // p, p, p
        grid = size // p
        return grid, grid, height // grid, width // grid

    def check_inputs(self, hidden_states, timestep, class_labels, encoder_hidden_states, trained_grid=None):
        cfg = self.config
        if hidden_states.ndim != 4 or hidden_states.shape[1] != cfg.in_channels:
            raise ValueError(
                f"`hidden_states` must have shape (batch, {cfg.in_channels}, height, width), got {tuple(hidden_states.shape)}."
            )
        batch, _, height, width = hidden_states.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"`hidden_states` height and width ({height}, {width}) must be multiples of {p}.")
        if self.uses_trained_grid(trained_grid):
            grid_h, grid_w, patch_h, patch_w = self.token_grid(height, width, trained_grid)
            if (grid_h * patch_h, grid_w * patch_w) != (height, width):
                step = cfg.sample_size // p
                model = "the text model" if trained_grid is None else "`trained_grid=True`"
                raise ValueError(
                    f"`hidden_states` height and width ({height}, {width}) must be multiples of {step} with {model}: "
                    f"the backbone sees a {step}x{step} token grid at every resolution."
                )
        if timestep.ndim > 1 or timestep.numel() not in (1, batch):
            raise ValueError(f"`timestep` must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}.")
        if self.is_text_conditional:
            if class_labels is not None:
                raise ValueError("`class_labels` was given to a text-to-image model; pass `encoder_hidden_states`.")
            if encoder_hidden_states is None:
                raise ValueError("`encoder_hidden_states` is required by the text-to-image model.")
            expected = (batch, cfg.text_max_length, cfg.text_embed_dim)
            if tuple(encoder_hidden_states.shape) != expected:
                raise ValueError(
                    f"`encoder_hidden_states` must have shape {expected} (batch, text_max_length, text_embed_dim), "
                    f"got {tuple(encoder_hidden_states.shape)}."
                )
        else:
            if encoder_hidden_states is not None:
                raise ValueError(
                    "`encoder_hidden_states` was given to a class-conditional model; pass `class_labels`."
                )
            if class_labels is None:
                raise ValueError("`class_labels` is required by the class-conditional model.")
            if class_labels.ndim > 1 or class_labels.numel() not in (1, batch):
                raise ValueError(
                    f"`class_labels` must be a scalar or have shape ({batch},), got {tuple(class_labels.shape)}."
                )
            # Checked where it costs no device sync: on CPU tensors (the pipelines check the ids before any device).
            on_cpu = class_labels.device.type == "cpu" and not torch.compiler.is_compiling()
            if on_cpu and ((class_labels < 0) | (class_labels > cfg.num_classes)).any():
                raise ValueError(
                    f"`class_labels` must lie in [0, {cfg.num_classes}] ({cfg.num_classes} is the null class), "
                    f"got {class_labels.tolist()}."
                )

    @apply_lora_scale("attention_kwargs")
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        trained_grid: bool | None = None,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        """
        The [`PixNerdTransformer2DModel`] forward method.

        Args:
            hidden_states (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Noisy pixels in [-1, 1].
            timestep (`torch.Tensor` or `float`):
                `sigma * 1000`, a scalar or one per sample (1000 = pure noise, 0 = clean image).
            class_labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Class ids for the class-conditional model; `num_classes` is the null class.
            encoder_hidden_states (`torch.Tensor` of shape `(batch_size, text_max_length, text_embed_dim)`, *optional*):
                Text encoder hidden states for the text-to-image model.
            attention_kwargs (`dict`, *optional*):
                `{"scale": float}` scales the LoRA layers loaded through PEFT.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`~models.modeling_outputs.Transformer2DModelOutput`] or a plain tuple.
            trained_grid (`bool`, *optional*):
                At a size other than `sample_size`: `True` keeps the backbone on the trained token grid (the input
                resized to `sample_size`, nearest) and lets the neural field decode larger or smaller patches; `False`
                runs the backbone on `height / patch_size x width / patch_size` tokens. Defaults to `True` for the text
                model (official app.py) and `False` for the class-conditional one (its official forward); the
                pipelines pass `True`. Identical at `sample_size`.

        Returns:
            The flow velocity `noise - x0`, shaped like `hidden_states`.
        """
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        class_labels = torch.as_tensor(class_labels, device=hidden_states.device) if class_labels is not None else None
        self.check_inputs(hidden_states, timestep, class_labels, encoder_hidden_states, trained_grid)
        batch, _, height, width = hidden_states.shape
        dtype = self.dtype  # the compute dtype: layerwise casting and quantized weights store another one
        p = self.config.patch_size
        grid_h, grid_w, patch_h, patch_w = self.token_grid(height, width, trained_grid)
        checkpoint = (
            self._gradient_checkpointing_func if torch.is_grad_enabled() and self.gradient_checkpointing else None
        )

        # 1. Time: the official t (0 = noise) and its sinusoid (max_period 10, [cos, sin]) in float32.
        t = 1 - timestep.float().reshape(-1).expand(batch) / NUM_TRAIN_TIMESTEPS
        t_freq = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0, max_period=10)
        t_emb = self.time_embedder(t_freq.to(dtype))[:, None]  # (B, 1, D)

        # 2. Tokens: the backbone sees the image resized (nearest) to its token grid.
        x = hidden_states.to(dtype)
        backbone_input = x
        if (grid_h * p, grid_w * p) != (height, width):
            backbone_input = F.interpolate(x, size=(grid_h * p, grid_w * p), mode="nearest")
        tokens = self.patch_embed(patchify(backbone_input, p, p).flatten(2))  # (B, L, D)

        # 3. Condition and 2D RoPE (official positions: normalised extent 16 for C2I, token extents for T2I).
        context = None
        head_dim = self.config.attention_head_dim
        if self.is_text_conditional:
            c = F.silu(t_emb)
            context = self.text_norm(self.text_proj(encoder_hidden_states.to(dtype))) + self.text_pos_embed.to(dtype)
            for block in self.text_refiner_blocks:
                context = checkpoint(block, context, c) if checkpoint else block(context, c)
            # x extent from the grid height and y extent from its width (swapped on non-square grids), as in
            # the official rope.py `precompute_freqs_cis_ex2d`.
            angles = rope_angles(head_dim, grid_h, grid_w, float(grid_h), float(grid_w))
        else:
            c = F.silu(t_emb + self.class_embedder(class_labels.reshape(-1).expand(batch))[:, None])
            angles = rope_angles(head_dim, grid_h, grid_w, 16.0, 16.0)
        angles = angles.to(hidden_states.device)
        rope = (angles.cos()[:, None], angles.sin()[:, None])  # (N, 1, D/2): broadcast over heads

        # 4. DiT blocks.
        for block in self.transformer_blocks:
            tokens = checkpoint(block, tokens, c, rope, context) if checkpoint else block(tokens, c, rope, context)
        tokens = F.silu(t_emb + tokens)  # (B, L, D)

        # 5. Neural field: every token decodes its patch of the full-resolution image.
        if self.is_text_conditional:
            # Real part of the official complex RoPE table over the patch (what casting it to a real dtype keeps).
            f2 = self.config.neural_field_max_freqs**2
            positions = rope_angles(2 * f2, patch_h, patch_w, patch_h * (16 / patch_h), patch_w * (16 / patch_w)).cos()
        else:
            positions = dct_features(patch_h, patch_w, self.config.neural_field_max_freqs)
        pixels = patchify(x, patch_h, patch_w).transpose(-1, -2).flatten(0, 1)  # (B*L, P, C)
        out = self.neural_field(pixels, tokens.flatten(0, 1), positions.to(hidden_states.device), checkpoint)
        out = unpatchify(out.unflatten(0, (batch, -1)), grid_h, grid_w, patch_h, patch_w)

        # The official network predicts x0 - noise; diffusers' flow models predict noise - x0.
        sample = -out
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)
