# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Official PixNerd checkpoints (github MCG-NJU/PixNerd) -> a `PixNerdTransformer2DModel`.

A Lightning file holds `state_dict` with the online weights (`denoiser.*`), the EMA weights (`ema_denoiser.*`,
converted by default) and the training-only REPA projector (`diffusion_trainer.*`, dropped). Files are read with
`torch.load(weights_only=True)`: no pickled code runs. The architecture is read from the tensor shapes; the key map
below renames the official modules to ours. `FromOfficialCheckpointMixin` gives the model `from_single_file`.
"""

import inspect
import os
import re

import huggingface_hub
import torch
from diffusers.utils import logging
from safetensors.torch import load_file

# Official key (after the `denoiser.` prefix) -> ours, with q, k, v (and the text k, v) still stacked in one projection
# (`to_qkv`, `add_kv_proj`; split into diffusers' names by `_split_stacked`); `{i}` is a block index.
_COMMON_KEYS = {
    "s_embedder.proj.": "patch_embed.",
    "t_embedder.mlp.0.": "time_embedder.linear_1.",
    "t_embedder.mlp.2.": "time_embedder.linear_2.",
    "x_embedder.embedder.0.": "neural_field.in_proj.",
    "final_layer.linear.": "neural_field.proj_out.",
    "final_layer.norm.": "neural_field.norm_out.",
}
_BLOCK_KEYS = {  # inside a DiT or text-refine block
    "norm1.": "norm1.",
    "norm2.": "norm2.",
    "attn.qkv.": "attn.to_qkv.",
    "attn.qkv_x.": "attn.to_qkv.",
    "attn.kv_y.": "attn.add_kv_proj.",
    "attn.q_norm.": "attn.norm_q.",
    "attn.k_norm.": "attn.norm_k.",
    "attn.proj.": "attn.to_out.0.",
    "mlp.w12.": "ff.proj_in.",  # text model: fused gate/up, `w3` is the down projection
    "adaLN_modulation.0.": "modulation.",
}
_NEURAL_FIELD_BLOCK_KEYS = {"param_generator1.0.": "param_generator.", "norm.": "norm."}
_IGNORED_PREFIXES = ("diffusion_trainer.", "conditioner.", "vae.", "diffusion_sampler.")

# The official attention stacks q, k, v (and the text k, v) by rows in one linear; ours has diffusers' separate ones.
_STACKED = {".attn.to_qkv.": ("to_q", "to_k", "to_v"), ".attn.add_kv_proj.": ("add_k_proj", "add_v_proj")}

DEFAULT_SAMPLE_SIZE = {"class": 256, "text": 512}

logger = logging.get_logger(__name__)


def load_official_state_dict(path: str, mmap: bool = False) -> dict:
    """Reads a `.ckpt`/`.pt` (Lightning or plain state dict) or `.safetensors` file into a flat state dict; with
    `mmap` a `.ckpt`/`.pt` file's tensors are memory-mapped, not read (for its keys and shapes)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`checkpoint` {path!r} is not a file.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"`checkpoint` {path!r} is empty (0 bytes): an interrupted download or copy?")
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors' errors do not name the file
            raise ValueError(
                f"`checkpoint` {path!r} could not be read as a safetensors file ({type(e).__name__}: {e}); it may be "
                "truncated or not a safetensors file."
            ) from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the file is not what we expect
        raise ValueError(
            f"`checkpoint` {path!r} could not be read as a weights-only PyTorch checkpoint ({type(e).__name__}: {e})."
        ) from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        ckpt = ckpt["state_dict"]
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"`checkpoint` {path!r} holds no state dict of tensors; it is not a PixNerd checkpoint.")
    return ckpt


def select_denoiser(state_dict: dict, ema: bool = True) -> dict:
    """The denoiser weights (EMA by default) without their prefix; a bare denoiser state dict passes through."""
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}  # torch.compile wrappers
    prefix = "ema_denoiser." if ema else "denoiser."
    if any(k.startswith(("denoiser.", "ema_denoiser.")) for k in state_dict):
        selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not selected:
            raise ValueError(f"The checkpoint has no `{prefix}*` weights (ema={ema}); try the other setting.")
        return selected
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_IGNORED_PREFIXES)}
    if "s_embedder.proj.weight" not in state_dict:
        raise ValueError(
            "Not a PixNerd checkpoint: no `denoiser.*`, `ema_denoiser.*` or `s_embedder.proj.weight` key."
        )
    return state_dict


def _count_blocks(state_dict: dict, prefix: str, suffix: str) -> int:
    return len(
        {m.group(1) for k in state_dict if (m := re.match(rf"{re.escape(prefix)}(\d+)\.{re.escape(suffix)}", k))}
    )


# Keys only the text-to-image official model has: any of them makes a checkpoint a text one.
_TEXT_MARKERS = ("y_pos_embedding", "y_embedder.proj.weight", "blocks.0.mlp.w12.weight", "blocks.0.attn.kv_y.weight")


def _shape(state_dict: dict, key: str, variant: str) -> torch.Size:
    """The shape of `state_dict[key]`; a missing key is a `ValueError` naming it."""
    if key not in state_dict:
        raise ValueError(f"The checkpoint lacks `{key}`, which every official {variant} PixNerd denoiser has.")
    return state_dict[key].shape


def is_text_to_image_checkpoint(path: str) -> bool:
    """Whether an official checkpoint file holds a text-to-image model, from its keys alone (nothing converted)."""
    state_dict = load_official_state_dict(path, mmap=True)
    names = {key.replace("_orig_mod.", "").split("denoiser.", 1)[-1] for key in state_dict}
    return any(marker in names for marker in _TEXT_MARKERS)


def infer_config(state_dict: dict, sample_size: int | None = None) -> dict:
    """The `PixNerdTransformer2DModel` config of an official denoiser state dict, read from tensor shapes."""
    is_text = any(k in state_dict for k in _TEXT_MARKERS)
    variant = "text-to-image" if is_text else "class-conditional"
    dim, patch_in = _shape(state_dict, "s_embedder.proj.weight", variant)
    in_channels, nf_dim = _shape(state_dict, "final_layer.linear.weight", variant)
    nf_in = _shape(state_dict, "x_embedder.embedder.0.weight", variant)[1]
    head_dim = _shape(state_dict, "blocks.0.attn.q_norm.weight", variant)[0]
    num_layers = _count_blocks(state_dict, "blocks.", "adaLN_modulation")
    num_nf_layers = _count_blocks(state_dict, "blocks.", "param_generator1")
    # The neural-field blocks follow the DiT blocks in the official `blocks` list.
    nf_out = _shape(state_dict, f"blocks.{num_layers}.param_generator1.0.weight", variant)[0]
    patch_size = round((patch_in / in_channels) ** 0.5)
    max_freqs = round((nf_in - in_channels) ** 0.5)
    config = dict(
        patch_size=patch_size,
        in_channels=in_channels,
        num_layers=num_layers,
        num_attention_heads=dim // head_dim,
        attention_head_dim=head_dim,
        num_neural_field_layers=num_nf_layers,
        neural_field_hidden_size=nf_dim,
        neural_field_mlp_ratio=nf_out // (2 * nf_dim * nf_dim),
        neural_field_max_freqs=max_freqs,
    )
    if is_text:
        _, text_len, _ = _shape(state_dict, "y_pos_embedding", variant)
        mlp_hidden = _shape(state_dict, "blocks.0.mlp.w12.weight", variant)[0] // 2
        config.update(
            num_classes=None,
            text_embed_dim=_shape(state_dict, "y_embedder.proj.weight", variant)[1],
            text_max_length=text_len,
            num_text_refiner_layers=_count_blocks(state_dict, "text_refine_blocks.", "adaLN_modulation"),
            mlp_ratio=mlp_hidden / dim,
            sample_size=sample_size or DEFAULT_SAMPLE_SIZE["text"],
        )
    else:
        mlp_hidden = _shape(state_dict, "blocks.0.mlp.w1.weight", variant)[0]
        config.update(
            num_classes=_shape(state_dict, "y_embedder.embedding_table.weight", variant)[0] - 1,
            mlp_ratio=4.0,
            sample_size=sample_size or DEFAULT_SAMPLE_SIZE["class"],
        )
        if int(2 * int(dim * 4.0) / 3) != mlp_hidden:
            raise ValueError(
                f"Unsupported MLP width {mlp_hidden} for hidden size {dim} (expected the official 4x * 2/3)."
            )
    if patch_size**2 * in_channels != patch_in or max_freqs**2 + in_channels != nf_in:
        raise ValueError("Not a PixNerd checkpoint: inconsistent patch embedding or neural-field input shapes.")
    return config


def _rename(key: str, num_layers: int) -> str | None:
    for old, new in _COMMON_KEYS.items():
        if key.startswith(old):
            return new + key[len(old) :]
    if key == "y_embedder.embedding_table.weight":
        return "class_embedder.weight"
    if key == "y_pos_embedding":
        return "text_pos_embed"
    if key.startswith("y_embedder.proj."):
        return "text_proj." + key[len("y_embedder.proj.") :]
    if key.startswith("y_embedder.norm."):
        return "text_norm." + key[len("y_embedder.norm.") :]
    m = re.match(r"(blocks|text_refine_blocks)\.(\d+)\.(.*)", key)
    if m is None:
        return None
    group, index, rest = m.group(1), int(m.group(2)), m.group(3)
    if group == "blocks" and index >= num_layers:
        table, prefix = _NEURAL_FIELD_BLOCK_KEYS, f"neural_field.blocks.{index - num_layers}."
    else:
        table = _BLOCK_KEYS
        prefix = f"{'transformer_blocks' if group == 'blocks' else 'text_refiner_blocks'}.{index}."
    for old, new in table.items():
        if rest.startswith(old):
            return prefix + new + rest[len(old) :]
    return None


def _split_stacked(key: str, value: torch.Tensor) -> dict:
    """`{key: value}`, or for a stacked attention projection its row blocks under diffusers' separate names."""
    for stacked, names in _STACKED.items():
        if stacked in key:
            if value.shape[0] % len(names):
                raise ValueError(f"`{key}` has {value.shape[0]} rows, not a multiple of {len(names)}.")
            parts = value.chunk(len(names), dim=0)
            return {key.replace(stacked, f".attn.{name}."): part.clone() for name, part in zip(names, parts)}
    return {key: value}


def convert_state_dict(state_dict: dict, config: dict) -> dict:
    """Renames an official denoiser state dict to ours; unknown keys raise."""
    converted, unknown = {}, []
    num_layers, is_text = config["num_layers"], config.get("text_embed_dim") is not None
    for key, value in state_dict.items():
        m = re.match(r"(blocks|text_refine_blocks)\.(\d+)\.mlp\.(w1|w2|w3)\.weight", key)
        if m and not is_text:  # class-conditional FeedForward: w2(silu(w1 x) * w3 x)
            continue  # fused below
        if m and is_text and m.group(3) == "w3":  # text SwiGLU: w3 is the down projection
            group = "transformer_blocks" if m.group(1) == "blocks" else "text_refiner_blocks"
            converted[f"{group}.{m.group(2)}.ff.proj_out.weight"] = value
            continue
        new = _rename(key, num_layers)
        if new is None:
            unknown.append(key)
        else:
            converted.update(_split_stacked(new, value))
    if not is_text:
        for i in range(num_layers):
            w1, w3, w2 = (state_dict.get(f"blocks.{i}.mlp.{w}.weight") for w in ("w1", "w3", "w2"))
            if w1 is None or w3 is None or w2 is None:
                raise ValueError(f"Missing MLP weights of official block {i} (`blocks.{i}.mlp.w1/w2/w3`).")
            converted[f"transformer_blocks.{i}.ff.proj_in.weight"] = torch.cat([w1, w3], dim=0)
            converted[f"transformer_blocks.{i}.ff.proj_out.weight"] = w2
    if unknown:
        raise ValueError(f"Unknown keys in the official checkpoint: {sorted(unknown)[:10]}")
    return converted


def _looks_local(path: str) -> bool:
    """A path meant for this machine: absolute, `./`, `../` or `~`, or inside a folder that exists here."""
    if os.path.isabs(path) or path.startswith((".", "~")):
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def resolve_checkpoint_file(path_or_hub_file: str, **hub_kwargs) -> str:
    """A local file, or `org/repo/file.ckpt` / a `https://huggingface.co/org/repo/blob/main/file` URL on the Hub.
    `hub_kwargs` are options of `huggingface_hub.hf_hub_download`; anything else is an error, also for local files."""
    options = set(inspect.signature(huggingface_hub.hf_hub_download).parameters) - {"repo_id", "filename"}
    unknown = sorted(set(hub_kwargs) - options)
    if unknown:
        raise TypeError(
            f"Unexpected keyword argument(s) {unknown} for loading an official checkpoint: expected `ema`, "
            f"`sample_size`, `dtype` or Hub download options ({', '.join(sorted(options))})."
        )
    path_or_hub_file = os.path.expanduser(path_or_hub_file)  # `~/file.ckpt` is local, as the error below says
    if os.path.isfile(path_or_hub_file):
        return path_or_hub_file
    if os.path.isdir(path_or_hub_file):
        found = sorted(name for name in os.listdir(path_or_hub_file) if name.endswith((".ckpt", ".safetensors")))
        hint = f" (it holds {', '.join(found[:3])})" if found else ""
        raise IsADirectoryError(
            f"`checkpoint` {path_or_hub_file!r} is a directory{hint}: pass the official checkpoint file inside it "
            "(a Lightning .ckpt or .safetensors), or load the folder with `PixNerdPipeline.from_pretrained`."
        )
    if not path_or_hub_file.startswith("https://") and _looks_local(path_or_hub_file):
        raise FileNotFoundError(f"`checkpoint` {path_or_hub_file!r}: no such local file.")
    m = re.match(r"(?:https://huggingface\.co/)?([^/]+/[^/]+)/(?:(?:blob|resolve)/([^/]+)/)?(.+)$", path_or_hub_file)
    if m is None:
        raise FileNotFoundError(f"{path_or_hub_file!r} is neither a local file nor a Hub file path (`org/repo/file`).")
    repo_id, url_revision, filename = m.groups()
    revision = hub_kwargs.pop("revision", None)
    if url_revision and revision and url_revision != revision:
        raise ValueError(f"`revision` {revision!r} contradicts the revision {url_revision!r} in the URL.")
    return huggingface_hub.hf_hub_download(repo_id, filename, revision=url_revision or revision, **hub_kwargs)


def sample_size_from_name(checkpoint: str) -> int | None:
    """The resolution an official file name states ("res512_ft200k_..." -> 512), else `None`."""
    match = re.search(r"res(\d{3,4})(?!\d)", os.path.basename(checkpoint))
    return int(match.group(1)) if match else None


def official_state_dict_for_model(
    checkpoint: str, ema: bool = True, sample_size: int | None = None, **hub_kwargs
) -> tuple[dict, dict]:
    """The model config and the renamed state dict of an official checkpoint (local path, `org/repo/file.ckpt` or
    Hub URL). `sample_size` is the trained resolution, not stored in the file: taken from names like
    `res512_...`, else 256 for class-conditional checkpoints and 512 for text-to-image ones (logged)."""
    state_dict = select_denoiser(load_official_state_dict(resolve_checkpoint_file(checkpoint, **hub_kwargs)), ema=ema)
    if sample_size is None:
        sample_size = sample_size_from_name(checkpoint)
    if sample_size is not None and not (isinstance(sample_size, int) and sample_size > 0):
        raise ValueError(f"`sample_size` must be a positive integer, got {sample_size!r}.")
    try:
        config = infer_config(state_dict, sample_size=sample_size)
        converted = convert_state_dict(state_dict, config)
    except ValueError as e:  # the functions above see tensors only: name the file
        raise ValueError(f"`checkpoint` {checkpoint!r} ({'EMA' if ema else 'online'} weights): {e}") from e
    if sample_size is None:
        logger.info(
            "%s does not record its resolution: assuming sample_size %d (pass `sample_size` if it was trained at "
            "another one).",
            checkpoint,
            config["sample_size"],
        )
    return config, converted


class FromOfficialCheckpointMixin:
    """`from_single_file` for a model class built from `infer_config`'s config (`PixNerdTransformer2DModel`)."""

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str,
        ema: bool = True,
        sample_size: int | None = None,
        dtype: torch.dtype | None = None,
        **hub_kwargs,
    ):
        """Loads an official PixNerd checkpoint: a local `.ckpt`/`.pt`/`.safetensors` file, a Hub file
        (`org/repo/file.ckpt`) or a Hub URL (`hub_kwargs`: `revision`, `token`, `cache_dir`, ...).

        `ema` chooses the EMA weights (default) or the online ones; `sample_size` is the trained resolution (see
        `official_state_dict_for_model`); `dtype` the dtype of the weights (default float32).
        """
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}.")
        config, converted = official_state_dict_for_model(
            pretrained_model_link_or_path, ema, sample_size, **hub_kwargs
        )
        with torch.device("meta"):
            model = cls(**config)
        missing = sorted(set(model.state_dict()) - set(converted))
        if missing:
            raise ValueError(
                f"`checkpoint` {pretrained_model_link_or_path!r} lacks weights for {len(missing)} parameters of the "
                f"model its shapes describe: {missing[:5]} (a truncated or edited official checkpoint?)"
            )
        if dtype is not None:  # cast the tensors, not the model: `ModelMixin.to(dtype)` warns on every cast
            converted = {k: v.to(dtype) if v.is_floating_point() else v for k, v in converted.items()}
        model.load_state_dict(converted, strict=True, assign=True)
        return model.eval()
