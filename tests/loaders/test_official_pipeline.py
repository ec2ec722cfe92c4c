"""Official checkpoints as pipelines (loaders/official_pipeline.py): `from_single_file` with the official sampler
presets, `from_pretrained` of an official folder or Hub repo converted once and then loaded offline, the text-to-image
pipeline without its Qwen3 encoder."""

import os
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel, imagenet_id2label
from diffusers_pixnerd.testing_utils import qwen3_tokenizer, tiny_qwen3

from ..helpers import C2I_CKPT, LABELS, T2I_CKPT, TOLERANCE, relative_error, sample, tiny_c2i_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ official checkpoints


def test_from_single_file_c2i_uses_the_euler100_preset():
    pipe = PixNerdPipeline.from_single_file(C2I_CKPT)
    assert type(pipe) is PixNerdPipeline and pipe.transformer.config.num_classes == 10
    assert pipe.config.id2label is None and pipe.labels == {}  # ImageNet names only for 1000 classes
    config = pipe.scheduler.config
    assert (config.solver_order, config.num_inference_steps, config.guidance_scale, config.shift) == (1, 100, 3.5, 1.0)
    assert (config.guidance_interval_min, config.guidance_interval_max) == (0.1, 1.0)
    assert pipe.transformer.config.sample_size == 256


def test_from_single_file_c2i_with_another_preset():
    pipe = PixNerdPipeline.from_single_file(C2I_CKPT, scheduler_preset="c2i-adams50", sample_size=16)
    assert (pipe.scheduler.config.solver_order, pipe.scheduler.config.num_inference_steps) == (2, 50)
    assert pipe.transformer.config.sample_size == 16


def test_from_single_file_of_a_1000_class_checkpoint_has_imagenet_labels(tmp_path):
    checkpoint = torch.load(C2I_CKPT, map_location="cpu", weights_only=True)
    for prefix in ("denoiser.", "ema_denoiser."):  # the same tiny model with ImageNet's 1000 classes + null
        checkpoint["state_dict"][f"{prefix}y_embedder.embedding_table.weight"] = torch.randn(1001, 32)
    torch.save(checkpoint, tmp_path / "imagenet.ckpt")
    pipe = PixNerdPipeline.from_single_file(str(tmp_path / "imagenet.ckpt"), sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.id2label == imagenet_id2label()
    assert torch.equal(
        sample(pipe, "golden retriever", num_inference_steps=2), sample(pipe, 207, num_inference_steps=2)
    )


def test_from_single_file_t2i_uses_the_t2i_preset():
    pipe = PixNerdT2IPipeline.from_single_file(T2I_CKPT, text_encoder=None, sample_size=16)
    assert type(pipe) is PixNerdT2IPipeline and pipe.text_encoder is None and pipe.tokenizer is None
    config = pipe.scheduler.config
    assert (config.solver_order, config.num_inference_steps, config.guidance_scale, config.shift) == (2, 25, 4.0, 3.0)
    assert (config.guidance_interval_min, config.guidance_interval_max) == (0.0, 1.0)
    assert pipe.transformer.config.sample_size == 16 and pipe.transformer.config.text_embed_dim == 24


def test_from_single_file_of_a_c2i_checkpoint_on_the_t2i_pipeline_raises():
    with pytest.raises(ValueError, match=r"PixNerdPipeline, not PixNerdT2IPipeline"):
        PixNerdT2IPipeline.from_single_file(C2I_CKPT)
    with pytest.raises(ValueError, match=r"PixNerdT2IPipeline, not PixNerdPipeline"):
        PixNerdPipeline.from_single_file(T2I_CKPT, text_encoder=None)


def count_conversions(monkeypatch) -> list[str]:
    calls, original = [], PixNerdTransformer2DModel.from_single_file

    def counting(checkpoint, *args, **kwargs):
        calls.append(checkpoint)
        return original(checkpoint, *args, **kwargs)

    monkeypatch.setattr(PixNerdTransformer2DModel, "from_single_file", counting)
    return calls


def test_from_pretrained_converts_an_official_folder_once(tmp_path, monkeypatch):
    folder = tmp_path / "PixNerd-tiny"
    folder.mkdir()
    shutil.copy(C2I_CKPT, folder / "model.ckpt")
    expected = sample(PixNerdPipeline.from_single_file(C2I_CKPT, sample_size=16), [1, 2], num_inference_steps=2)
    conversions = count_conversions(monkeypatch)

    first = PixNerdPipeline.from_pretrained(folder, cache_dir=tmp_path / "cache", sample_size=16)
    second = PixNerdPipeline.from_pretrained(folder, cache_dir=tmp_path / "cache", sample_size=16)
    assert conversions == [str(folder / "model.ckpt")]
    for pipe in (first, second):
        pipe.set_progress_bar_config(disable=True)
        assert type(pipe) is PixNerdPipeline
        assert relative_error(sample(pipe, [1, 2], num_inference_steps=2), expected) < TOLERANCE


def test_from_pretrained_converts_an_official_t2i_folder(tmp_path):
    folder = tmp_path / "PixNerd-t2i-tiny"
    folder.mkdir()
    shutil.copy(T2I_CKPT, folder / "model.ckpt")
    pipe = PixNerdT2IPipeline.from_pretrained(
        folder, cache_dir=tmp_path / "cache", sample_size=16, text_encoder=None, tokenizer=None
    )
    assert type(pipe) is PixNerdT2IPipeline and pipe.text_encoder is None
    assert pipe.scheduler.config.num_inference_steps == 25 and pipe.transformer.config.sample_size == 16


def test_from_pretrained_converts_an_official_hub_repo_and_then_works_offline(tmp_path, monkeypatch):
    import huggingface_hub

    downloads = []

    def hf_hub_download(repo_id, filename, revision=None, token=None, **kwargs):
        downloads.append((repo_id, filename))
        return C2I_CKPT

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: ["README.md", "t.ckpt"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    conversions = count_conversions(monkeypatch)
    pipe = PixNerdPipeline.from_pretrained("MCG-NJU/PixNerd-tiny", cache_dir=tmp_path, sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    assert downloads == [("MCG-NJU/PixNerd-tiny", "t.ckpt")] and conversions == [C2I_CKPT]
    expected = sample(pipe, [1, 2], num_inference_steps=2)

    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached = PixNerdPipeline.from_pretrained("MCG-NJU/PixNerd-tiny", cache_dir=tmp_path, sample_size=16)
    cached.set_progress_bar_config(disable=True)
    assert len(conversions) == 1
    assert relative_error(sample(cached, [1, 2], num_inference_steps=2), expected) < TOLERANCE


def test_from_pretrained_loads_a_cached_hub_pipeline_offline(tmp_path, monkeypatch):
    import huggingface_hub

    # A diffusers-format repo (e.g. one made by `push_to_hub`) as the Hub cache holds it after a download.
    repo = tmp_path / "models--user--tiny-pixnerd"
    pipe = tiny_c2i_pipeline(id2label=LABELS)
    pipe.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    expected = sample(pipe, [1, 2])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    for loader in (DiffusionPipeline, PixNerdPipeline):
        loaded = loader.from_pretrained("user/tiny-pixnerd", cache_dir=tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is PixNerdPipeline
        assert relative_error(sample(loaded, [1, 2]), expected) < TOLERANCE


# ----------------------------------------------------------------------------------- text-to-image without its encoder


def test_t2i_official_repo_offline_without_qwen3_names_it_and_the_ways_out(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, **kw: ["README.md", "t.ckpt"])
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo_id, filename, **kw: T2I_CKPT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(OSError) as error:
        PixNerdT2IPipeline.from_pretrained("MCG-NJU/PixNerd-tiny-T2I", cache_dir=tmp_path, sample_size=16)
    message = str(error.value)
    assert "'Qwen/Qwen3-1.7B'" in message
    assert "`text_encoder=` and `tokenizer=`" in message and "`prompt_embeds`" in message
    # Both ways out work offline: no encoder (prompt embeddings), or one passed in.
    pipe = PixNerdT2IPipeline.from_pretrained(
        "MCG-NJU/PixNerd-tiny-T2I", cache_dir=tmp_path, sample_size=16, text_encoder=None, tokenizer=None
    )
    pipe.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(0))
    images = sample(pipe, prompt_embeds=embeds, negative_prompt_embeds=torch.zeros(1, 6, 24), num_inference_steps=1)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    with_encoder = PixNerdT2IPipeline.from_pretrained(
        "MCG-NJU/PixNerd-tiny-T2I",
        cache_dir=tmp_path,
        sample_size=16,
        text_encoder=tiny_qwen3(),
        tokenizer=qwen3_tokenizer(),
    )
    assert with_encoder.text_encoder is not None


def test_t2i_from_single_file_without_qwen3_names_it():
    import huggingface_hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", os.devnull)
        with pytest.raises(OSError, match=r"'Qwen/Qwen3-1\.7B'.*`prompt_embeds`"):
            PixNerdT2IPipeline.from_single_file(T2I_CKPT, sample_size=16)
