"""Any size in both variants (issue 20): the backbone keeps its trained token grid and the neural field decodes larger
or smaller patches; the text-to-image pipeline without its Qwen3 encoder offline. Bad input with a clear error naming
the argument or file (issue 21): guidance intervals, generators, prompt embeddings, `id2label`, folders whose config
disagrees with the weights or holds another model, official checkpoints missing a key, local paths that do not exist.
"""

import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_C2I, TINY_T2I, qwen3_tokenizer, randomize_, tiny_qwen3
from test_pipelines import C2I_CKPT, T2I_CKPT, sample, tiny_c2i_pipeline, tiny_t2i_pipeline

from diffusers_pixnerd import (
    PixNerdFlowMatchScheduler,
    PixNerdPipeline,
    PixNerdT2IPipeline,
    PixNerdTransformer2DModel,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny models run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(variant: str, **overrides) -> PixNerdTransformer2DModel:
    torch.manual_seed(0)
    config = {**(TINY_C2I if variant == "c2i" else TINY_T2I), **overrides}
    return randomize_(PixNerdTransformer2DModel(**config)).eval()


def condition(variant: str, batch: int) -> dict:
    if variant == "c2i":
        return {"class_labels": torch.arange(1, batch + 1)}
    return {"encoder_hidden_states": torch.randn(batch, 6, 24, generator=torch.Generator().manual_seed(1))}


# ------------------------------------------------------------------------------------------------------- any size


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_trained_grid_decodes_twice_the_size_in_larger_patches(variant):
    # The tiny models are trained at 16 px in 4 px patches (a 4x4 grid). At 32 px on the trained grid each token decodes
    # an 8x8 patch. An input repeated 2x2 (what the backbone's nearest resize inverts exactly) gives the backbone the
    # same tokens, and the patch corners sit at the same neural-field positions (0 and 1) with the same pixel values,
    # so they must equal the corners at 16 px: the backbone kept its grid and only the neural field sampled more.
    model, cond = tiny_model(variant), condition(variant, 2)
    x16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x32 = x16.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    with torch.no_grad():
        out16 = model(x16, 400.0, **cond).sample
        out32 = model(x32, 400.0, **cond, trained_grid=True).sample
    assert model.token_grid(32, 32, trained_grid=True) == (4, 4, 8, 8)
    torch.testing.assert_close(out32[..., ::8, ::8], out16[..., ::4, ::4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out32[..., 7::8, 7::8], out16[..., 3::4, 3::4], rtol=1e-5, atol=1e-5)
    # In between, the field renders new positions: not a copy of the 16 px output.
    assert (out32[..., 1::8, 1::8] - out16[..., ::4, ::4]).abs().max() > 1e-3


def test_c2i_forward_keeps_the_official_native_grid_by_default():
    # The official class-conditional forward runs any size on its own grid (parity fixtures); the trained grid is an
    # opt-in, and at the trained size both are the same computation.
    model, cond = tiny_model("c2i"), condition("c2i", 2)
    assert model.token_grid(32, 32) == (8, 8, 4, 4) and model.token_grid(32, 32, trained_grid=False) == (8, 8, 4, 4)
    x16, x32 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x16, 300.0, **cond).sample, model(x16, 300.0, **cond, trained_grid=True).sample)
        native, trained = (model(x32, 300.0, **cond, trained_grid=g).sample for g in (None, True))
    assert (native - trained).abs().max() > 1e-3


@pytest.mark.parametrize("trained_grid", [False, True])
def test_c2i_pipeline_samples_other_sizes_on_the_native_grid_unless_asked(trained_grid):
    # One Euler step from sigma 1 to 0 without guidance: image = noise - v(noise), v on the grid asked for (the native
    # grid by default, as the official sampler; the parity at 32 px is in test_pipelines.py).
    pipe = tiny_c2i_pipeline(solver_order=1, num_inference_steps=1, guidance_scale=1.0)
    latents = torch.randn(2, 3, 32, 24, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    with torch.no_grad():
        expected = pipe.transformer(latents, 1000.0, class_labels=labels, trained_grid=trained_grid).sample
        other = pipe.transformer(latents, 1000.0, class_labels=labels, trained_grid=not trained_grid).sample
    kwargs = {"trained_grid": True} if trained_grid else {}
    images = sample(pipe, [1, 2], latents=latents, **kwargs)
    torch.testing.assert_close(images, latents - expected, rtol=0, atol=1e-6)
    assert (images - (latents - other)).abs().max() > 1e-3


def test_c2i_pipeline_sizes_are_multiples_of_the_patch_or_of_the_trained_grid_when_asked():
    # Trained at 32 px in 4 px patches (an 8x8 grid): on the native grid the pipeline takes multiples of the patch (4),
    # with `trained_grid=True` multiples of 8. The text model always keeps its grid: lcm(patch, grid).
    torch.manual_seed(0)
    transformer = PixNerdTransformer2DModel(**{**TINY_C2I, "sample_size": 32}).eval()
    pipe = PixNerdPipeline(transformer=transformer, scheduler=PixNerdFlowMatchScheduler(num_inference_steps=1))
    pipe.set_progress_bar_config(disable=True)
    assert transformer.resolution_multiple == 4 and transformer.size_multiple(True) == 8
    assert PixNerdTransformer2DModel(**{**TINY_T2I, "sample_size": 32}).resolution_multiple == 8
    assert sample(pipe, [1], height=36, width=32).shape == (1, 3, 36, 32)
    with pytest.raises(ValueError, match=r"`height` and `width` must be positive multiples of 4, got \(34, 32\)"):
        sample(pipe, [1], height=34, width=32)
    with pytest.raises(ValueError, match=r"must be positive multiples of 8 with `trained_grid=True`, got \(36, 32\)"):
        sample(pipe, [1], height=36, width=32, trained_grid=True)
    with pytest.raises(ValueError, match="`trained_grid` must be True or False, got 'yes'"):
        sample(pipe, [1], trained_grid="yes")
    with pytest.raises(ValueError, match=r"must be multiples of 8 with `trained_grid=True`"):
        transformer(torch.randn(1, 3, 36, 32), 500.0, class_labels=torch.tensor([1]), trained_grid=True)
    with pytest.raises(ValueError, match="`trained_grid` must be True, False or None"):
        transformer(torch.randn(1, 3, 32, 32), 500.0, class_labels=torch.tensor([1]), trained_grid="yes")
    # Class ids out of range: named on CPU tensors (checked without a device sync; the pipelines check ids earlier).
    with pytest.raises(ValueError, match=r"`class_labels` must lie in \[0, 10\] \(10 is the null class\), got \[11\]"):
        transformer(torch.randn(1, 3, 32, 32), 500.0, class_labels=torch.tensor([11]))


def test_class_accuracy_averages_larger_samples_down_to_the_classifier_size():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import evaluate

    classifier = os.path.join(ROOT, "models", "fashion-mnist-classifier.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = list(range(10)) * 2
    at_32 = evaluate.class_accuracy(classifier, images, labels)
    at_64 = evaluate.class_accuracy(classifier, images.repeat(2, axis=1).repeat(2, axis=2), labels)
    assert at_64 == at_32
    assert evaluate.parse_args(["--model", "m", "--resolution", "64"]).resolution == 64


# ------------------------------------------------------------------------------- text-to-image without its encoder


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


# -------------------------------------------------------------------------------------------- pipeline arguments


@pytest.mark.parametrize("interval", [0.5, "01", "ab", (None, 1.0), (0.1, 0.5, 1.0), [0.1, float("nan")]], ids=repr)
def test_guidance_interval_that_is_not_a_pair_of_numbers_is_named(interval):
    with pytest.raises(ValueError, match=r"`guidance_interval` must be a pair of numbers \(min, max\)"):
        sample(tiny_c2i_pipeline(), [1], guidance_interval=interval)
    with pytest.raises(ValueError, match=r"`guidance_interval` must be a pair of numbers"):
        sample(tiny_t2i_pipeline(), prompt_embeds=torch.zeros(1, 6, 24), guidance_interval=interval, guidance_scale=1)


def test_guidance_interval_as_a_list_array_or_tensor_samples_like_a_tuple():
    pipe = tiny_c2i_pipeline()
    expected = sample(pipe, [1], guidance_interval=(0.25, 1.0))
    for interval in ([0.25, 1.0], np.array([0.25, 1.0]), torch.tensor([0.25, 1.0])):
        assert torch.equal(sample(pipe, [1], guidance_interval=interval), expected)


@pytest.mark.parametrize("generator", [0, [0], [torch.Generator(), 1]], ids=repr)
def test_a_seed_given_as_generator_is_named(generator):
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match=r"`generator` must be a torch.Generator .*got (a list holding )?int"):
        pipe([1] * (len(generator) if isinstance(generator, list) else 1), generator=generator, output_type="latent")


@pytest.mark.parametrize("name", ["prompt_embeds", "negative_prompt_embeds"])
@pytest.mark.parametrize(
    "embeds, got",
    [
        ([[[0.0] * 24] * 6], r"a list \(`torch.tensor"),
        (torch.zeros(6, 24), r"shape \(6, 24\) \(one prompt: `\[None\]`"),
    ],
    ids=["nested lists", "2-D"],
)
def test_prompt_embeds_that_are_not_a_3d_tensor_are_named(name, embeds, got):
    kwargs = {"prompt_embeds": torch.zeros(1, 6, 24), "negative_prompt_embeds": torch.zeros(1, 6, 24), name: embeds}
    with pytest.raises(ValueError, match=rf"`{name}` must be a torch.Tensor of shape .* \(batch, 6, 24\), got {got}"):
        sample(tiny_t2i_pipeline(), **kwargs)


def test_prompt_embeds_without_a_batch_axis_are_named_before_the_missing_encoder():
    with pytest.raises(ValueError, match=r"`prompt_embeds` must be a torch.Tensor"):
        sample(tiny_t2i_pipeline(), prompt_embeds=torch.zeros(6, 24))  # guidance on and no negative embeddings


@pytest.mark.parametrize("id2label", [["cat", "dog"], ("cat", "dog"), "cat"], ids=repr)
def test_id2label_that_is_not_a_dict_is_named(id2label):
    with pytest.raises(ValueError, match=r"`id2label` must be a dict of class names.*got a (list|tuple|str)"):
        tiny_c2i_pipeline(id2label=id2label)


# ------------------------------------------------------------------------------------------------- saved folders


def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_a_config_whose_num_layers_disagrees_with_the_weights_is_named(tmp_path, num_layers):
    tiny_c2i_pipeline().save_pretrained(tmp_path)  # 2 DiT blocks
    edit_json(tmp_path / "transformer" / "config.json", num_layers=num_layers)
    expected = rf"weights in {re.escape(str(tmp_path / 'transformer'))} do not fit its config.json: `num_layers` is "
    expected += rf"{num_layers} in "
    expected += r"config.json but the weights hold 2 blocks"
    with pytest.raises(ValueError, match=expected):
        PixNerdTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    with pytest.raises(ValueError, match=expected):
        PixNerdPipeline.from_pretrained(tmp_path)


def test_a_config_that_fits_its_weights_still_loads_with_loading_info(tmp_path):
    pipe = tiny_c2i_pipeline()
    pipe.transformer.save_pretrained(tmp_path)
    model, info = PixNerdTransformer2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pipe.transformer.state_dict().values()))


def tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def test_a_unet_config_in_a_pixnerd_folder_is_named(tmp_path):
    tiny_c2i_pipeline().save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "transformer")
    tiny_unet().save_pretrained(tmp_path / "transformer")
    expected = rf"{re.escape(str(tmp_path / 'transformer' / 'config.json'))} is the config of a UNet2DModel, not of"
    with pytest.raises(ValueError, match=expected):
        PixNerdTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    with pytest.raises(ValueError, match=expected):
        PixNerdPipeline.from_pretrained(tmp_path)
    # The folder's model_index.json naming a UNet as the transformer.
    edit_json(tmp_path / "model_index.json", transformer=["diffusers", "UNet2DModel"])
    with pytest.raises(ValueError, match="`transformer` must be a PixNerdTransformer2DModel, got a UNet2DModel"):
        PixNerdPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`transformer` must be a PixNerdTransformer2DModel, got a UNet2DModel"):
        PixNerdT2IPipeline(transformer=tiny_unet(), scheduler=PixNerdFlowMatchScheduler())


@pytest.mark.parametrize(
    "checkpoint, key",
    [
        (C2I_CKPT, "y_embedder.embedding_table.weight"),
        (C2I_CKPT, "blocks.0.mlp.w1.weight"),
        (C2I_CKPT, "blocks.2.param_generator1.0.weight"),  # the first neural-field block
        (T2I_CKPT, "y_pos_embedding"),
        (T2I_CKPT, "y_embedder.proj.weight"),
        (T2I_CKPT, "blocks.0.mlp.w12.weight"),
    ],
)
def test_an_official_checkpoint_missing_a_key_names_the_file_and_the_key(tmp_path, checkpoint, key):
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    del state_dict[f"ema_denoiser.{key}"]
    path = str(tmp_path / "edited.ckpt")
    torch.save({"state_dict": state_dict}, path)
    expected = rf"`checkpoint` '{re.escape(path)}' \(EMA weights\): The checkpoint lacks `{key}`, which every official"
    with pytest.raises(ValueError, match=expected):
        PixNerdTransformer2DModel.from_single_file(path, sample_size=16)


def test_an_official_checkpoint_missing_a_bias_names_the_file(tmp_path):
    state_dict = torch.load(C2I_CKPT, map_location="cpu", weights_only=True)["state_dict"]
    del state_dict["ema_denoiser.t_embedder.mlp.0.bias"]
    path = str(tmp_path / "edited.ckpt")
    torch.save({"state_dict": state_dict}, path)
    expected = rf"`checkpoint` '{re.escape(path)}' lacks weights for 1 parameters .*time_embedder"
    with pytest.raises(ValueError, match=expected):
        PixNerdPipeline.from_single_file(path, sample_size=16)


# ---------------------------------------------------------------------------------------------------- local paths


@pytest.mark.parametrize("name", ["models/no-such-model", "./no-such-model", "../no-such-model", "a/b/c"])
def test_a_local_path_that_does_not_exist_offline_says_so(tmp_path, monkeypatch, name):
    import huggingface_hub

    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expected = rf"`pretrained_model_name_or_path` '{re.escape(name)}': the local path "
    expected += rf"'{re.escape(os.path.abspath(name))}' does not exist"
    for loader in (PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel):
        with pytest.raises(FileNotFoundError, match=expected):
            loader.from_pretrained(name, cache_dir=tmp_path / "cache")


def test_a_cached_hub_repo_named_like_a_local_folder_still_loads_offline(tmp_path, monkeypatch):
    import huggingface_hub

    # "user/tiny-pixnerd" while a folder "user" exists here: the Hub cache has the repo, so it is not a missing path.
    repo = tmp_path / "cache" / "models--user--tiny-pixnerd"
    pipe = tiny_c2i_pipeline()
    pipe.save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (tmp_path / "work" / "user").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = PixNerdPipeline.from_pretrained("user/tiny-pixnerd", cache_dir=tmp_path / "cache")
    loaded.set_progress_bar_config(disable=True)
    # The same weights; float32 kernels may block a freshly loaded tensor differently (seen: 4e-6 apart).
    torch.testing.assert_close(sample(loaded, [1]), sample(pipe, [1]), rtol=1e-5, atol=1e-5)
