# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""LoRA in training: adding the adapters to the transformer or the text encoder (`add_lora_adapters`), switching them
off to compute as the base model (`adapters_disabled`), what a LoRA run's checkpoints hold (the adapters and the REPA
projector, not the frozen base: Accelerate's save/load hooks), the export in diffusers' LoRA format
(`save_lora_adapters`), and loading a LoRA checkpoint's adapters (EMA or trained) onto a base transformer."""

import os
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from ..utils import normal_permissions, sub_state_dict
from .ema import ema_file_in, load_ema_state

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: `load_lora_weights(folder)` finds it
PROJECTOR_FILE = "projector.safetensors"  # the REPA projector of a LoRA run


def add_lora_adapters(
    transformer,
    rank: int,
    alpha: int | None = None,
    dropout: float = 0.0,
    target_modules: list[str] | None = None,
    base_dtype: torch.dtype = torch.float32,
    use_dora: bool = False,
):
    """Freezes `transformer` (or a text encoder) in `base_dtype` and adds trainable LoRA adapters (PEFT, Gaussian init,
    so the output is unchanged at step 0; DoRA with `use_dora`); the adapters are float32 whatever the base
    (diffusers' `cast_training_params`)."""
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import PreTrainedModel

    from ..loaders.lora_pipeline import add_text_encoder_adapter

    transformer.requires_grad_(False)
    transformer.to(dtype=base_dtype)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha or rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules,
        use_dora=use_dora,
    )
    if hasattr(transformer, "add_adapter") and not isinstance(transformer, PreTrainedModel):
        transformer.add_adapter(config)  # diffusers' PEFT integration
    else:  # a transformers text encoder: through PEFT directly (see `add_text_encoder_adapter`)
        add_text_encoder_adapter(transformer, config)
    cast_training_params(transformer, dtype=torch.float32)
    return transformer


def word_token_ids(tokenizer, words: list[str]) -> list[int]:
    """The token ids of `words` as captions hold them: alone, after a space, and capitalised ("Blue coat", "a blue
    coat"), sorted."""
    variants = {v for word in words for w in (word.strip(), word.strip().capitalize()) for v in (w, " " + w)}
    return sorted({i for v in variants for i in tokenizer(v, add_special_tokens=False)["input_ids"]})


def restrict_embedding_adapters(text_encoder: nn.Module, token_ids: list[int]) -> int:
    """Lets the token-embedding adapters of `text_encoder` (`lora_embedding_A`, one column per token; LoRA on
    `embed_tokens`) learn the embeddings of `token_ids` only, as textual inversion does: every other column's gradient
    is zeroed, and since PEFT starts those columns at zero they stay zero (AdamW moves nothing without a gradient), so
    a prompt without those tokens is encoded exactly as the base encoder does. Returns how many adapters it masked."""
    masked = 0
    for name, parameter in text_encoder.named_parameters():
        if "lora_embedding_A" in name:
            mask = torch.zeros(parameter.shape[1], dtype=parameter.dtype, device=parameter.device)
            mask[token_ids] = 1
            parameter.register_hook(lambda grad, mask=mask: grad * mask)
            masked += 1
    return masked


@contextmanager
def adapters_disabled(*modules: nn.Module | None) -> Iterator[None]:
    """Switches off the PEFT adapters (LoRA, DoRA) of `modules` inside the block: they compute as the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules if module is not None for m in module.modules() if isinstance(m, BaseTunerLayer)]
    layers = [layer for layer in layers if not layer.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def has_adapters(module: nn.Module | None) -> bool:
    """Whether `module` carries PEFT adapters (a text encoder without any is frozen or fully trained)."""
    return module is not None and bool(getattr(module, "peft_config", None))


def adapter_state(module: nn.Module, state_dict: dict | None = None) -> tuple[dict, dict]:
    """`(adapter weights on the CPU, adapter config)` of `module`'s PEFT adapter "default" (as it is now, or taken from
    `state_dict`)."""
    from peft.utils import get_peft_model_state_dict

    adapters = get_peft_model_state_dict(module, state_dict=state_dict)
    adapters = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapters.items()}
    return adapters, module.peft_config["default"].to_dict()


def save_lora_adapters(
    transformer: nn.Module,
    folder: str,
    state_dict: dict | None = None,
    text_encoder: nn.Module | None = None,
    text_encoder_state_dict: dict | None = None,
):
    """The adapters of `transformer` (and of `text_encoder` if it has any) as `pytorch_lora_weights.safetensors` in
    diffusers' LoRA format (`transformer.` and `text_encoder.` keys) with the adapter configs as metadata: what
    `pipe.load_lora_weights(folder)` loads. The weights are the modules' own, or taken from the state dicts (e.g. the
    gathered EMA weights of an FSDP run)."""
    from ..loaders import PixNerdLoraLoaderMixin

    layers, config = adapter_state(transformer, state_dict)
    text_layers, text_config = None, None
    if has_adapters(text_encoder):
        text_layers, text_config = adapter_state(text_encoder, text_encoder_state_dict)
    PixNerdLoraLoaderMixin.save_lora_weights(
        folder,
        transformer_lora_layers=layers,
        text_encoder_lora_layers=text_layers,
        transformer_lora_adapter_metadata=config,
        text_encoder_lora_adapter_metadata=text_config,
    )
    normal_permissions(os.path.join(folder, LORA_WEIGHTS_FILE))


def save_adapter_state(module: nn.Module, folder: str):
    """What a LoRA run trains, from its training module into a checkpoint folder: the adapters of the transformer and
    of a text encoder trained with LoRA (`save_lora_adapters`), and the REPA projector when there is one
    (`projector.safetensors`)."""
    from safetensors.torch import save_file

    save_lora_adapters(module.transformer, folder, text_encoder=getattr(module, "text_encoder", None))
    if module.projector is not None:
        projector = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.projector.state_dict().items()}
        save_file(projector, os.path.join(folder, PROJECTOR_FILE))


def load_adapter_state(module: nn.Module, folder: str):
    """Puts the adapters and the projector of a LoRA checkpoint back into the training module, exactly (no dtype
    change); a checkpoint of other adapters (rank, target modules, text encoder) or REPA setting is an error naming
    the flag."""
    from peft import set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    path = os.path.join(folder, LORA_WEIGHTS_FILE)
    saved = load_file(path)
    text_encoder = getattr(module, "text_encoder", None)
    parts = [("transformer", module.transformer, "`--lora_rank` and `--lora_target_modules`")]
    if has_adapters(text_encoder) or any(k.startswith("text_encoder.") for k in saved):
        flags = "`--train_text_encoder`, `--text_encoder_lora_rank` and `--text_encoder_lora_target_modules`"
        if not has_adapters(text_encoder):
            raise ValueError(f"{path} holds text-encoder adapters: resume with the {flags} of the run that wrote it.")
        parts.append(("text_encoder", text_encoder, flags))
    for prefix, part, flags in parts:
        adapters = sub_state_dict(saved, prefix)
        expected = get_peft_model_state_dict(part)
        shapes = {k: tuple(v.shape) for k, v in adapters.items()}
        if shapes != {k: tuple(v.shape) for k, v in expected.items()}:
            different = sorted(set(shapes) ^ set(expected)) or [k for k in shapes if shapes[k] != expected[k].shape]
            raise ValueError(
                f"{path} holds other {prefix} adapters than this run trains (e.g. {different[0]}): resume with the "
                f"{flags} of the run that wrote it."
            )
        set_peft_model_state_dict(part, adapters, adapter_name="default")
    projector_file = os.path.join(folder, PROJECTOR_FILE)
    if (module.projector is not None) != os.path.isfile(projector_file):
        raise ValueError(
            f"{folder} was written {'without' if module.projector is not None else 'with'} REPA: resume with the "
            "`--use_repa` / `--no_use_repa` of the run that wrote it."
        )
    if module.projector is not None:
        module.projector.load_state_dict(load_file(projector_file))


def register_adapter_checkpoint_hooks(accelerator, module: nn.Module):
    """Accelerate's save/load hooks for a LoRA run: `save_state` writes the adapters and the projector of the training
    module (`save_adapter_state`, main process) instead of the module's full weights, and `load_state` reads them
    back; the optimizer, lr schedule, grad scaler and RNG files stay Accelerate's. Under DeepSpeed the engine still
    writes and reads its own model files (the hooks then only add the LoRA file)."""

    def position(models) -> int | None:
        return next((i for i, m in enumerate(models) if accelerator.unwrap_model(m) is module), None)

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_adapter_state(module, output_dir)
        i = position(models)
        if i is not None and len(weights) == len(models):  # DeepSpeed and FSDP save their models themselves
            weights.pop(i)  # Accelerate would otherwise write the whole module, frozen base included

    def load_hook(models, input_dir):
        i = position(models)
        if i is not None:
            models.pop(i)
            load_adapter_state(module, input_dir)

    return accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)


def load_lora_checkpoint_weights(transformer: nn.Module, checkpoint: str, use_ema: bool = True) -> str:
    """Loads the adapters of a LoRA checkpoint onto the base `transformer` as a new PEFT adapter (as
    `pipe.load_lora_weights(checkpoint)` does), then, when the run kept an EMA and `use_ema`, puts the EMA of the
    adapters in their place. Returns which ("ema" or "trained")."""
    from ..loaders import PixNerdLoraLoaderMixin

    before = set(getattr(transformer, "peft_config", {}))
    state_dict, metadata = PixNerdLoraLoaderMixin.lora_state_dict(checkpoint, return_lora_metadata=True)
    PixNerdLoraLoaderMixin.load_lora_into_transformer(state_dict, transformer=transformer, metadata=metadata)
    ema_file = ema_file_in(checkpoint)
    if not (use_ema and ema_file):
        return "trained"
    (adapter,) = set(transformer.peft_config) - before
    # The EMA follows the trained parameters in their order: the adapters' lora_A / lora_B weights.
    names = [n for n, _ in transformer.named_parameters() if f".{adapter}." in n and ".lora_" in n]
    shadow = load_ema_state(ema_file)["shadow_params"]
    parameters = dict(transformer.named_parameters())
    if len(shadow) != len(names) or any(s.shape != parameters[n].shape for s, n in zip(shadow, names)):
        raise ValueError(f"{ema_file} holds {len(shadow)} tensors that do not match the {len(names)} adapter weights.")
    with torch.no_grad():
        for name, value in zip(names, shadow):
            parameters[name].copy_(value)
    return "ema"
