"""`diffusers_pixnerd.load_pipeline` (every kind of model as the pipeline of its kind), the cache spec of
`models.cache.cache_config`, and the benchmarks' `build` that benchmarks/gpu_checks.py builds on."""

import json
import os
import shutil
import sys

import pytest
import torch
from conftest import FIXTURES
from diffusers import (
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel, load_pipeline
from diffusers_pixnerd.models import cache_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
BUNDLED = os.path.join(ROOT, "models", "pixnerd-fashion-mnist")
BUNDLED_T2I = os.path.join(ROOT, "models", "pixnerd-t2i-fashion-mnist")
BUNDLED_LORA = os.path.join(ROOT, "models", "pixnerd-t2i-fashion-mnist-red-lora")
C2I_CKPT = os.path.join(FIXTURES, "official_c2i_tiny.ckpt")
T2I_CKPT = os.path.join(FIXTURES, "official_t2i_tiny.ckpt")


def images(pipe, **condition) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(**condition, num_inference_steps=2, generator=generator, output_type="pt").images


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """The official checkpoints converted during the test."""
    calls, original = [], PixNerdTransformer2DModel.from_single_file

    def counting(checkpoint, *args, **kwargs):
        calls.append(str(checkpoint))
        return original(checkpoint, *args, **kwargs)

    monkeypatch.setattr(PixNerdTransformer2DModel, "from_single_file", counting)
    return calls


# ------------------------------------------------------------------------------------------------ the kinds of model


def test_a_saved_folder_loads_as_its_class_like_from_pretrained():
    pipe = load_pipeline(BUNDLED, dtype=torch.float32, device="cpu")
    assert type(pipe) is PixNerdPipeline and pipe.transformer.dtype == torch.float32
    expected = images(PixNerdPipeline.from_pretrained(BUNDLED), class_labels=[1, 7])
    assert torch.equal(images(pipe, class_labels=[1, 7]), expected)
    assert load_pipeline(BUNDLED, dtype=torch.bfloat16).transformer.dtype == torch.bfloat16


def test_a_lora_is_loaded_at_its_scale():
    prompt = ["a red dress"]
    base = PixNerdT2IPipeline.from_pretrained(BUNDLED_T2I)
    without = images(base, prompt=prompt)
    base.load_lora_weights(BUNDLED_LORA)
    at_half = images(base, prompt=prompt, attention_kwargs={"scale": 0.5})  # diffusers' per-call scale
    pipe = load_pipeline(BUNDLED_T2I, lora=BUNDLED_LORA, lora_scale=0.5)
    assert type(pipe) is PixNerdT2IPipeline
    torch.testing.assert_close(images(pipe, prompt=prompt), at_half, rtol=0, atol=1e-6)
    assert (at_half - without).abs().max() > 0.05  # the LoRA changes the images
    full = load_pipeline(BUNDLED_T2I, lora=BUNDLED_LORA)  # scale 1 by default
    assert torch.equal(images(full, prompt=prompt), images(base, prompt=prompt))


@pytest.mark.parametrize(
    "checkpoint, cls, components",
    [(C2I_CKPT, PixNerdPipeline, {}), (T2I_CKPT, PixNerdT2IPipeline, dict(text_encoder=None, tokenizer=None))],
    ids=["c2i", "t2i"],
)
def test_an_official_folder_is_converted_once_as_the_pipeline_of_its_kind(
    tmp_path, conversions, checkpoint, cls, components
):
    folder = tmp_path / "official"
    folder.mkdir()
    shutil.copy(checkpoint, folder / "model.ckpt")
    options = dict(cache_dir=tmp_path / "cache", sample_size=16, **components)
    pipe = load_pipeline(folder, **options)
    again = load_pipeline(str(folder), **options)
    assert conversions == [str(folder / "model.ckpt")]  # the loader and from_pretrained share one conversion
    assert type(pipe) is cls and type(again) is cls
    assert pipe.transformer.config.sample_size == 16
    steps = pipe.scheduler.config.num_inference_steps
    assert steps == (100 if cls is PixNerdPipeline else 25)  # the paper's sampler of the kind


def test_an_official_hub_repo_is_converted_once_then_loads_offline(tmp_path, monkeypatch, conversions):
    import huggingface_hub

    downloads = []

    def hf_hub_download(repo_id, filename, revision=None, token=None, **kwargs):
        downloads.append((repo_id, filename))
        return C2I_CKPT

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: ["README.md", "t.ckpt"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    pipe = load_pipeline("MCG-NJU/PixNerd-tiny", cache_dir=tmp_path, sample_size=16)
    assert type(pipe) is PixNerdPipeline
    assert downloads == [("MCG-NJU/PixNerd-tiny", "t.ckpt")] and conversions == [C2I_CKPT]

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached = load_pipeline("MCG-NJU/PixNerd-tiny", cache_dir=tmp_path, sample_size=16)
    assert len(conversions) == 1
    assert torch.equal(images(cached, class_labels=[1, 2]), images(pipe, class_labels=[1, 2]))


def test_an_official_checkpoint_file_is_converted_to_its_kind():
    pipe = load_pipeline(C2I_CKPT, sample_size=16)
    assert type(pipe) is PixNerdPipeline
    expected = images(PixNerdPipeline.from_single_file(C2I_CKPT, sample_size=16), class_labels=[3])
    assert torch.equal(images(pipe, class_labels=[3]), expected)


def test_cache_and_compile_are_set_up_on_the_device():
    pipe = load_pipeline(BUNDLED, device="cpu", cache="pab", compile="regional")
    assert pipe.transformer.is_cache_enabled
    pipe._current_timestep = torch.tensor(321.0)  # what PAB reads while the pipeline samples
    assert pipe.transformer._cache_config.current_timestep_callback() == 321.0
    blocks = pipe.transformer.transformer_blocks
    assert all(block._compiled_call_impl is not None for block in blocks)  # compiled lazily, at the first call
    assert pipe.transformer._compiled_call_impl is None
    full = load_pipeline(BUNDLED, cache=FirstBlockCacheConfig(threshold=0.1), compile="full")
    assert full.transformer._cache_config.threshold == 0.1 and full.transformer._compiled_call_impl is not None


# ------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(model=3), ValueError, r"`model` must be a path or Hub repo id"),
        (dict(model="./no/such/folder"), FileNotFoundError, r"`model` './no/such/folder': the local path"),
        (dict(model=BUNDLED, compile="fast"), ValueError, r"`compile` must be None, 'none', 'regional' or 'full'"),
        (dict(model=BUNDLED, cache="teacache"), ValueError, r"`cache` must start with one of \['first_block'"),
        (dict(model=BUNDLED, cache=0.2), ValueError, r"`cache` must be a spec such as"),
        (dict(model=BUNDLED, lora_scale=0.5), ValueError, r"`lora_scale` 0.5 is given without `lora`"),
        (dict(model=BUNDLED, lora=BUNDLED_LORA, lora_scale="high"), ValueError, r"`lora_scale` must be a number"),
    ],
)
def test_bad_arguments_are_named_before_anything_loads(monkeypatch, kwargs, error, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(PixNerdPipeline, "from_pretrained", no_loading)
    with pytest.raises(error, match=message):
        load_pipeline(**kwargs)


def test_a_folder_that_is_no_pixnerd_pipeline_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`model` .* neither a model_index.json .* nor an official .ckpt"):
        load_pipeline(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline", "unet": ["x", "y"]}))
    with pytest.raises(ValueError, match=r"`model` .* holds a DDPMPipeline .*DiffusionPipeline.from_pretrained"):
        load_pipeline(tmp_path)


# ---------------------------------------------------------------------------------------------------- cache specs


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
    assert config.spatial_attention_timestep_skip_range == (100, 950) and config.spatial_attention_block_skip_range == 2
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


# ------------------------------------------------------------------------------------- the benchmarks' build(device)


def test_benchmark_sampling_builds_each_variant_from_a_given_pipeline():
    import benchmark_sampling

    args = benchmark_sampling.parse_args(
        ["--variants", "none", "cache=first_block:threshold=0.2+compile=regional", "--batch_size", "2"]
    )
    made = []

    def make_pipeline():
        made.append(PixNerdPipeline.from_pretrained(BUNDLED))
        return made[-1]

    pipes = benchmark_sampling.build(args, "cpu", make_pipeline=make_pipeline)
    assert list(pipes) == args.variants and [pipes[v] for v in args.variants] == made  # a fresh one per variant
    plain, fast = pipes["none"].transformer, pipes[args.variants[1]].transformer
    assert not plain.is_cache_enabled and plain.transformer_blocks[0]._compiled_call_impl is None
    assert fast._cache_config.threshold == 0.2 and fast.transformer_blocks[0]._compiled_call_impl is not None
    with pytest.raises(ValueError, match=r"`--variants`: 'fast' is not none or one of cache=..., compile=..., lora=..."):
        benchmark_sampling.build(benchmark_sampling.parse_args(["--variants", "fast"]), "cpu", make_pipeline)


def test_benchmark_sampling_rows_compare_each_variant_with_the_first():
    import benchmark_sampling

    variants = ["none", "cache=first_block:threshold=0.0"]  # a cache that never skips: the same images
    args = benchmark_sampling.parse_args(["--model", BUNDLED, "--variants", *variants, "--batch_size", "2"])
    args.num_inference_steps, args.repeats, args.warmup = 2, 1, 0
    rows = benchmark_sampling.benchmark(args)  # both loaded by `load_pipeline`
    assert [row["variant"] for row in rows] == variants
    # The same computation up to float rounding: with a cache each branch is its own call, whose other batch size
    # changes the GEMM blocking (seen: one pixel one level apart on some CPUs).
    assert all(row["max_pixel_diff"] <= 1 and row["mean_pixel_diff"] < 0.01 and row["min_s"] > 0 for row in rows)
    # 2 steps, CFG on 0.1 < t < 1: the first step (t = 0) unguided, the second on the doubled batch (with a cache:
    # the two branches apart).
    assert [(row["transformer_calls"], row["images_through_transformer"]) for row in rows] == [(2, 6), (3, 6)]


def test_benchmark_sampling_variants_set_the_sampler_and_the_call():
    import benchmark_sampling

    variants = ["none", "steps=1+guidance=1", "preset=c2i-euler100+steps=3"]
    args = benchmark_sampling.parse_args(["--model", BUNDLED, "--variants", *variants, "--batch_size", "2"])
    args.num_inference_steps, args.repeats, args.warmup = 2, 1, 0
    pipes = benchmark_sampling.build(args)
    assert pipes[variants[2]].scheduler.config.solver_order == 1  # the official Euler preset
    rows = {row["variant"]: row for row in benchmark_sampling.benchmark(args, pipes)}
    assert (rows["steps=1+guidance=1"]["transformer_calls"], rows["steps=1+guidance=1"]["images_through_transformer"]) == (1, 2)
    # Euler, 3 steps at t = 0, 1/3, 2/3: guided (0.1 < t < 1) at the last two.
    assert (rows[variants[2]]["transformer_calls"], rows[variants[2]]["images_through_transformer"]) == (3, 10)
    assert rows["steps=1+guidance=1"]["max_pixel_diff"] > 0


def test_gpu_checks_cache_sampling_runs_the_benchmark_on_random_pipelines(monkeypatch, tmp_path):
    import gpu_checks

    for name, preset in gpu_checks.SMOKE_PRESETS.items():  # what `--smoke` adds, undone after the test
        monkeypatch.setitem(gpu_checks.PIXNERD_PRESETS, name, preset)
    args = gpu_checks.parse_args(["--smoke", "--device", "cpu", "--checks", "cache_sampling"])
    rec = gpu_checks.Recorder(str(tmp_path / "result.json"))
    with torch.no_grad():
        gpu_checks.check_cache_sampling(args, rec)
    rows = json.loads((tmp_path / "result.json").read_text())["rows"]
    assert list(rows) == args.cache_variants and all(row["status"] == "ok" for row in rows.values())
    assert rows["cache=taylorseer:cache_interval=3"]["max_pixel_diff"] == 0  # 2 steps: both computed in full
    assert all(row["none_min_s"] > 0 and 0 <= row["max_pixel_diff"] <= 255 for row in rows.values())


def test_official_sampling_compare_reports_the_difference_of_the_two_samplers():
    import benchmark_official_sampling

    ours, official = torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.5])
    result = benchmark_official_sampling.compare(lambda: ours, lambda: (official,), repeats=2, device="cpu")
    assert result["max_rel_diff"] == pytest.approx(0.5 / 2.5)
    assert result["ours_s"] >= 0 and result["official_s"] >= 0


def test_the_benchmarks_lora_targets_are_the_training_scripts_default():
    import benchmark_training_memory

    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_pixnerd_t2i

    default = train_pixnerd_t2i.lora_target_modules(train_pixnerd_t2i.LORA_TARGET_MODULES)
    assert benchmark_training_memory.LORA_TARGETS == default
