"""models/cache.py: diffusers' cache hooks (`enable_cache`) on PixNerd: exact when they never skip, really skipping
when they may, one cache context per guidance branch (interval guidance turns the batch from B into 2B), clear errors
for the rest; and the cache specs of `cache_config`."""

import pytest
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    TextKVCacheConfig,
)

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.models import cache_config
from diffusers_pixnerd.models.cache import PerContextState
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I, randomize_

from ..helpers import BUNDLED

pytestmark = pytest.mark.usefixtures("single_thread")


STEPS = 6


INTERVAL = (0.3, 1.0)  # guidance switches on after the first steps: the batch goes from B to 2B


# --------------------------------------------------------------------------------------------------------- cache hooks


def tiny_pipeline(text: bool):
    torch.manual_seed(0)
    transformer = randomize_(PixNerdTransformer2DModel(**(TINY_T2I if text else TINY_C2I))).eval()
    scheduler = PixNerdFlowMatchScheduler(num_inference_steps=STEPS, guidance_scale=3.0)
    pipeline_class = PixNerdT2IPipeline if text else PixNerdPipeline
    pipe = pipeline_class(transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def condition(pipe) -> dict:
    if isinstance(pipe, PixNerdT2IPipeline):
        config = pipe.transformer.config
        gen = torch.Generator().manual_seed(3)
        shape = (2, config.text_max_length, config.text_embed_dim)
        return dict(prompt_embeds=torch.randn(shape, generator=gen), negative_prompt_embeds=torch.zeros(shape))
    return dict(class_labels=[1, 7])


def sample(pipe, seed=0, **kwargs) -> torch.Tensor:
    kwargs = {**condition(pipe), "guidance_interval": INTERVAL, **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images


def never_skipping(pipe) -> dict:
    """Cache configs whose hooks run but, as set, always compute."""
    return {
        "first_block": FirstBlockCacheConfig(threshold=0.0),
        "taylorseer": TaylorSeerCacheConfig(disable_cache_before_step=1000, taylor_factors_dtype=torch.float32),
        "taylorseer_blocks": TaylorSeerCacheConfig(
            disable_cache_before_step=1000,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"transformer_blocks\.\d+"],
        ),
        "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-2, -1),  # no timestep lies inside: never skipped
            current_timestep_callback=lambda: pipe.current_timestep,
        ),
        "mag_cache": MagCacheConfig(calibrate=True, num_inference_steps=STEPS),
    }


@pytest.mark.parametrize("text", [False, True], ids=["c2i", "t2i"])
@pytest.mark.parametrize(
    "name", ["first_block", "taylorseer", "taylorseer_blocks", "pyramid_attention_broadcast", "mag_cache"]
)
def test_a_cache_that_never_skips_gives_the_uncached_images(text, name):
    pipe = tiny_pipeline(text)
    # In float64: the branches then run as two calls instead of one batch of 2B without any visible rounding (in
    # float32 the random tiny T2I model amplifies the changed summation order to ~3e-5 of its output).
    pipe.transformer.double()
    expected = sample(pipe)
    pipe.transformer.enable_cache(never_skipping(pipe)[name])
    assert pipe.transformer.is_cache_enabled
    actual = sample(pipe)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    pipe.transformer.disable_cache()
    torch.testing.assert_close(sample(pipe), expected, rtol=0, atol=0)


def test_each_branch_is_its_own_call_and_cache_context_while_caching(monkeypatch):
    pipe = tiny_pipeline(text=False)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    calls, forward = [], pipe.transformer.forward

    def spy(hidden_states, *args, **kwargs):
        head = pipe.transformer.transformer_blocks[0]._diffusers_hook.hooks["fbc_leader_block_hook"]
        calls.append((hidden_states.shape[0], head.state_manager._context.name))
        return forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    sample(pipe)
    guided = pipe.guidance_steps(pipe.scheduler.timesteps, INTERVAL)
    assert 0 < sum(guided) < STEPS  # the interval really switches guidance on midway
    expected = []
    for active in guided:
        expected += [(2, "cond"), (2, "uncond")] if active else [(2, "cond")]
    assert calls == expected


@pytest.fixture(scope="module")
def bundled():
    pipe = PixNerdPipeline.from_pretrained(BUNDLED)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_samples(module: torch.nn.Module) -> list:
    """The batch size of every call of `module`: their sum is the work done, batched or one branch at a time."""
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize(
    "make_config, counted",
    [
        (lambda pipe: FirstBlockCacheConfig(threshold=0.2), "ff"),
        (
            lambda pipe: TaylorSeerCacheConfig(
                cache_interval=2,
                disable_cache_before_step=3,
                taylor_factors_dtype=torch.float32,
                cache_identifiers=[r"transformer_blocks\.\d+"],
            ),
            "ff",
        ),
        (
            lambda pipe: PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2,
                spatial_attention_timestep_skip_range=(100, 900),
                current_timestep_callback=lambda: pipe.current_timestep,
            ),
            "attn.to_q",
        ),
    ],
    ids=["first_block", "taylorseer_blocks", "pyramid_attention_broadcast"],
)
def test_caches_skip_work_and_stay_close_on_the_bundled_model(bundled, make_config, counted):
    pipe = bundled
    kwargs = dict(class_labels=[0, 5, 9], num_inference_steps=12, output_type="pt")
    calls = count_samples(pipe.transformer.transformer_blocks[-1].get_submodule(counted))
    expected = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    uncached_work = sum(calls)
    calls.clear()
    pipe.transformer.enable_cache(make_config(pipe))
    try:
        actual = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    finally:
        pipe.transformer.disable_cache()
    # The block caches skip whole blocks (their MLP does not run); PAB skips the attention (its projections).
    assert 0 < sum(calls) < uncached_work
    difference = (actual - expected).abs()
    assert 0 < difference.mean() < 0.05, difference.mean()


def test_pyramid_attention_broadcast_keeps_one_attention_cache_per_branch():
    pipe = tiny_pipeline(text=False)
    pipe.transformer.enable_cache(
        PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(0, 1000),
            current_timestep_callback=lambda: pipe.current_timestep,
        )
    )
    hook = pipe.transformer.transformer_blocks[0].attn._diffusers_hook.hooks["pyramid_attention_broadcast"]
    assert isinstance(hook.state, PerContextState)
    seen = []

    def inspect(pipeline, step, timestep, callback_kwargs):
        seen.append({name: state.cache.clone() for name, state in hook.state._state_cache.items()})
        return callback_kwargs

    sample(pipe, guidance_interval=(0.0, 1.0), callback_on_step_end=inspect)
    assert set(seen[-1]) == {"cond", "uncond"}
    # The unconditional branch's cached attention is its own (null-class modulation), not the conditional one's.
    assert not torch.allclose(seen[-1]["cond"], seen[-1]["uncond"])
    assert hook.state._state_cache == {}  # reset after the call (`maybe_free_model_hooks`)


def test_a_run_that_failed_midway_leaves_no_stale_cache_state():
    pipe = tiny_pipeline(text=False)
    pipe.transformer.enable_cache(
        TaylorSeerCacheConfig(
            cache_interval=2,
            disable_cache_before_step=2,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"transformer_blocks\.\d+"],
        )
    )
    fresh = sample(pipe)

    def fail(pipeline, step, timestep, callback_kwargs):
        if step == 3:
            raise RuntimeError("stop")
        return callback_kwargs

    with pytest.raises(RuntimeError, match="stop"):
        sample(pipe, seed=5, callback_on_step_end=fail)
    torch.testing.assert_close(sample(pipe), fresh, rtol=0, atol=0)


@pytest.mark.parametrize(
    "config, message",
    [
        (FasterCacheConfig(current_timestep_callback=lambda: 500), "FasterCacheConfig is not supported"),
        (TextKVCacheConfig(), "TextKVCacheConfig is not supported"),
        (TaylorSeerCacheConfig(use_lite_mode=True), "use_lite_mode"),
    ],
    ids=["faster_cache", "text_kv_cache", "taylorseer_lite"],
)
def test_caches_pixnerd_cannot_run_are_refused_with_the_reason(config, message):
    model = PixNerdTransformer2DModel(**TINY_T2I)
    with pytest.raises(ValueError, match=message):
        model.enable_cache(config)
    assert not model.is_cache_enabled


# --------------------------------------------------------------------------------------------------------- cache specs


def test_cache_specs_build_diffusers_cache_configs_with_pixnerd_defaults():
    from types import SimpleNamespace

    pipe = SimpleNamespace(current_timestep=torch.tensor(700.0), scheduler=SimpleNamespace(config={}))
    config = cache_config("first_block:threshold=0.3", pipe)
    assert isinstance(config, FirstBlockCacheConfig) and config.threshold == 0.3
    config = cache_config("taylorseer:cache_interval=4,taylor_factors_dtype=bfloat16", pipe)
    assert isinstance(config, TaylorSeerCacheConfig)
    assert (config.cache_interval, config.taylor_factors_dtype) == (4, torch.bfloat16)
    assert config.cache_identifiers == [r"transformer_blocks\.\d+"]  # whole DiT blocks by default
    config = cache_config("pab:spatial_attention_timestep_skip_range=(100,950)", pipe)
    assert isinstance(config, PyramidAttentionBroadcastConfig)
    assert (
        config.spatial_attention_timestep_skip_range == (100, 950) and config.spatial_attention_block_skip_range == 2
    )
    assert config.current_timestep_callback() == 700.0
    pipe.scheduler.config = {"num_inference_steps": 30}
    config = cache_config("mag:calibrate=True", pipe)
    assert isinstance(config, MagCacheConfig) and config.num_inference_steps == 30


@pytest.mark.parametrize(
    "spec, message",
    [
        ("teacache", r"`cache` must start with one of"),
        ("first_block:thresh=0.3", r"'thresh=0.3' is not key=value with a key of FirstBlockCacheConfig"),
        ("first_block:0.3", r"'0.3' is not key=value"),
        ("taylorseer:taylor_factors_dtype=fast", r"taylor_factors_dtype='fast' is not a torch dtype name"),
    ],
)
def test_a_bad_cache_spec_names_the_part_and_what_was_expected(spec, message):
    with pytest.raises(ValueError, match=message):
        cache_config(spec, pipe=None)
