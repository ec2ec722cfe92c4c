"""`diffusers_pixnerd.load_pipeline` (pipelines/loading.py): every kind of model as the pipeline of its kind, the
cache and compile set up on the device, bad arguments named before anything loads."""

import json
import shutil

import pytest
import torch
from diffusers import FirstBlockCacheConfig

from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel, load_pipeline
from diffusers_pixnerd.pipelines import pipeline_class

from ..helpers import BUNDLED, BUNDLED_LORA, BUNDLED_T2I, C2I_CKPT, T2I_CKPT

# -------------------------------------------------------------------------------------------------- the kinds of model


def images(pipe, **condition) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(**condition, num_inference_steps=2, generator=generator, output_type="pt").images


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


@pytest.fixture
def conversions(monkeypatch) -> list[str]:
    """The official checkpoints converted during the test."""
    calls, original = [], PixNerdTransformer2DModel.from_single_file

    def counting(checkpoint, *args, **kwargs):
        calls.append(str(checkpoint))
        return original(checkpoint, *args, **kwargs)

    monkeypatch.setattr(PixNerdTransformer2DModel, "from_single_file", counting)
    return calls


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
    # `pipeline_class` reads the checkpoint's kind, `from_pretrained` converts it: the same file (a cache hit the
    # second time in huggingface_hub), converted once.
    assert set(downloads) == {("MCG-NJU/PixNerd-tiny", "t.ckpt")} and conversions == [C2I_CKPT]

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached = load_pipeline("MCG-NJU/PixNerd-tiny", cache_dir=tmp_path, sample_size=16)
    assert len(conversions) == 1
    assert torch.equal(images(cached, class_labels=[1, 2]), images(pipe, class_labels=[1, 2]))


@pytest.mark.parametrize("checkpoint, cls", [(C2I_CKPT, PixNerdPipeline), (T2I_CKPT, PixNerdT2IPipeline)])
def test_pipeline_class_reads_an_official_checkpoints_kind_without_converting_it(
    tmp_path, conversions, checkpoint, cls
):
    folder = tmp_path / "official"
    folder.mkdir()
    shutil.copy(checkpoint, folder / "model.ckpt")
    cache = tmp_path / "cache"
    assert pipeline_class(folder, cache_dir=cache, sample_size=16) is cls
    assert pipeline_class(checkpoint) is cls
    assert conversions == [] and not cache.exists()  # nothing converted, nothing cached
    components = dict(text_encoder=None, tokenizer=None) if cls is PixNerdT2IPipeline else {}
    load_pipeline(folder, cache_dir=cache, sample_size=16, **components)  # from_pretrained converts, once
    assert pipeline_class(folder, cache_dir=cache, sample_size=16) is cls  # now read from the cached conversion
    assert conversions == [str(folder / "model.ckpt")]


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


# ----------------------------------------------------------------------------------------------------------- bad input


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
