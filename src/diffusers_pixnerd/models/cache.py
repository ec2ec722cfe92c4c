# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""What PixNerd needs from diffusers' cache hooks (`CacheMixin.enable_cache`).

The hooks find the DiT blocks by name (`transformer_blocks`) and read their inputs and outputs through
`TransformerBlockRegistry`; the pipelines run the conditional and unconditional branches as separate calls in their
own `cache_context` whenever a cache is enabled, because interval guidance switches the batch from B to 2B. Two things
are adapted here rather than in the pipelines:

- Pyramid Attention Broadcast keeps one cached attention output per layer whatever the context, so the second branch
  would reuse the first one's attention: its hooks get one state per cache context.
- Caches whose assumptions PixNerd breaks are refused with the reason, instead of producing wrong images.

`cache_config` turns a short spec (`first_block:threshold=0.2`, the `cache` of `load_pipeline` and the `--cache` of
the examples and benchmarks) into one of diffusers' cache configs with PixNerd's defaults.
"""

import ast
import dataclasses
import re

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.hooks import StateManager
from diffusers.hooks.pyramid_attention_broadcast import (
    _PYRAMID_ATTENTION_BROADCAST_HOOK,
    PyramidAttentionBroadcastState,
)

UNSUPPORTED_CACHES = {
    FasterCacheConfig: "FasterCache approximates the unconditional branch inside one batched [uncond, cond] call, but "
    "PixNerd's interval guidance changes that batch from B to 2B and the pipelines call each branch separately when "
    "a cache is enabled",
    TextKVCacheConfig: "the text keys and values are not constant over the steps: PixNerd's text refiner is "
    "conditioned on the timestep",
    SeaCacheConfig: "SeaCache's generic path expects video latents (C, T, H, W) and a model adapter",
}


# The caches `cache_config` names (docs/benchmarks.md has measured settings).
CACHES = {
    "first_block": FirstBlockCacheConfig,
    "taylorseer": TaylorSeerCacheConfig,
    "pab": PyramidAttentionBroadcastConfig,
    "mag": MagCacheConfig,
}


def parse_cache_spec(spec: str) -> tuple[type, dict]:
    """`NAME[:key=value,...]` as (the diffusers config class, the keyword arguments written in the spec). Values are
    Python literals (`(100,950)`, `0.2`) or plain words; keys ending in `dtype` take a torch dtype name."""
    if not isinstance(spec, str):
        raise ValueError(f"`cache` must be a string NAME[:key=value,...], got {type(spec).__name__} {spec!r}.")
    name, _, options = spec.partition(":")
    if name not in CACHES:
        raise ValueError(f"`cache` must start with one of {sorted(CACHES)}, got {name!r} (in {spec!r}).")
    config_class = CACHES[name]
    fields = {field.name for field in dataclasses.fields(config_class)}
    kwargs = {}
    for item in filter(None, re.split(r",(?=\s*\w+=)", options)):  # commas inside values, e.g. (100,950), stay
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"`cache` {spec!r}: {item!r} is not key=value with a key of {config_class.__name__}: {sorted(fields)}."
            )
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            pass  # a plain word, e.g. a dtype name
        if key.endswith("dtype") and isinstance(value, str):
            if not isinstance(getattr(torch, value, None), torch.dtype):
                raise ValueError(f"`cache` {spec!r}: {key}={value!r} is not a torch dtype name (e.g. float32).")
            value = getattr(torch, value)
        kwargs[key] = value
    return config_class, kwargs


def cache_config(spec: str, pipe):
    """`NAME[:key=value,...]` as a diffusers cache config for `pipe.transformer.enable_cache`, e.g.
    `first_block:threshold=0.2` or `taylorseer:cache_interval=3`. PixNerd defaults: TaylorSeer predicts whole DiT
    blocks with float32 factors (its default, the attention outputs, saves little here); PAB reads the pipeline's
    current timestep; MagCache the scheduler's number of steps."""
    config_class, options = parse_cache_spec(spec)
    if config_class is TaylorSeerCacheConfig:
        defaults = dict(cache_identifiers=[r"transformer_blocks\.\d+"], taylor_factors_dtype=torch.float32)
    elif config_class is PyramidAttentionBroadcastConfig:
        defaults = dict(spatial_attention_block_skip_range=2, current_timestep_callback=lambda: pipe.current_timestep)
    elif config_class is MagCacheConfig:
        defaults = dict(num_inference_steps=pipe.scheduler.config.get("num_inference_steps", 50))
    else:
        defaults = {}
    return config_class(**{**defaults, **options})


def check_cache_config(block_class: type, config) -> None:
    """Refuses the caches PixNerd cannot run correctly and registers the DiT block for the block-level caches."""
    for config_class, reason in UNSUPPORTED_CACHES.items():
        if isinstance(config, config_class):
            raise ValueError(f"{config_class.__name__} is not supported by PixNerd: {reason}.")
    if isinstance(config, TaylorSeerCacheConfig) and config.use_lite_mode:
        raise ValueError(
            "TaylorSeer's `use_lite_mode` is not supported by PixNerd: it zeroes every block's output, but PixNerd's "
            "blocks return the hidden states, not a residual. Pass `cache_identifiers` instead, e.g. "
            '[r"transformer_blocks\\.\\d+"].'
        )
    if block_class not in TransformerBlockRegistry._registry:
        # The block returns its hidden states alone; the text states pass through unchanged.
        TransformerBlockRegistry.register(block_class, TransformerBlockMetadata(return_hidden_states_index=0))


class PerContextState(StateManager):
    """A `StateManager` that also answers attribute reads and writes of the current context's state.

    A hook written against one plain state object (`self.state.cache`, `self.state.iteration`, `self.state.reset()`)
    then keeps one state per `cache_context`, and a default one for calls made outside any context.
    """

    _FORWARDED = ("cache", "iteration")

    def get_state(self):
        name = self._context.name if self._context is not None else None
        if name not in self._state_cache:
            self._state_cache[name] = self._state_cls(*self._init_args, **self._init_kwargs)
        return self._state_cache[name]

    def __getattr__(self, name):
        if name in PerContextState._FORWARDED:
            return getattr(self.get_state(), name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name in PerContextState._FORWARDED:
            setattr(self.get_state(), name, value)
        else:
            super().__setattr__(name, value)


def separate_cache_contexts(model, config) -> None:
    """After `enable_cache`: gives the hooks that keep a single state one state per cache context."""
    if not isinstance(config, PyramidAttentionBroadcastConfig):
        return
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.hooks.get(_PYRAMID_ATTENTION_BROADCAST_HOOK) if registry is not None else None
        if hook is not None and not isinstance(hook.state, PerContextState):
            hook.state = PerContextState(PyramidAttentionBroadcastState)
    HookRegistry.check_if_exists_or_initialize(model).invalidate_child_registries_cache()
