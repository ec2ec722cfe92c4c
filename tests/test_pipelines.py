"""Tests of PixNerdPipeline and PixNerdT2IPipeline: official parity, sampling behaviour, inputs, saving, Hub, LoRA."""

import json
import os
import runpy
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FIXTURES, TINY_C2I, TINY_T2I, qwen3_tokenizer, randomize_, tiny_qwen3
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from safetensors.torch import load_file

import diffusers_pixnerd
from diffusers_pixnerd import (
    PixNerdFlowMatchScheduler,
    PixNerdPipeline,
    PixNerdT2IPipeline,
    PixNerdTransformer2DModel,
    imagenet_id2label,
)

C2I_CKPT = os.path.join(FIXTURES, "official_c2i_tiny.ckpt")
T2I_CKPT = os.path.join(FIXTURES, "official_t2i_tiny.ckpt")
SAMPLES = os.path.join(FIXTURES, "official_pipeline_samples.safetensors")  # scripts/generate_pipeline_fixtures.py
TOLERANCE = 1e-5  # max |ours - official| / max |official|: float32 rounding (the sum order differs)
# Batched vs one-by-one: the GEMM blocking changes with the batch size, and the random tiny T2I model amplifies that
# float32 rounding to ~1.3e-5 in two guided steps (with the transformer in float64 both agree exactly).
BATCH_TOLERANCE = 1e-4

LABELS = {"0": "cat, kitty", "1": "dog", "2": "tench, Tinca tinca", "3": "goldfish"}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny models run fastest on one thread: a thread pool costs more than it saves (and far more on a busy
    machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def official_samples() -> tuple[dict, dict]:
    with safe_open(SAMPLES, "pt") as f:
        metadata = f.metadata()
    return load_file(SAMPLES), {k: json.loads(v) for k, v in metadata.items() if k != "official_commit"}


def tiny_c2i_pipeline(id2label=None, num_classes=10, **scheduler_kwargs) -> PixNerdPipeline:
    torch.manual_seed(0)
    transformer = randomize_(PixNerdTransformer2DModel(**{**TINY_C2I, "num_classes": num_classes})).eval()
    scheduler = PixNerdFlowMatchScheduler(**{"num_inference_steps": 2, "guidance_scale": 3.0, **scheduler_kwargs})
    pipe = PixNerdPipeline(transformer=transformer, scheduler=scheduler, id2label=id2label)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_t2i_pipeline(with_text_encoder=False, text_embed_dim=24, **scheduler_kwargs) -> PixNerdT2IPipeline:
    torch.manual_seed(0)
    transformer = randomize_(PixNerdTransformer2DModel(**{**TINY_T2I, "text_embed_dim": text_embed_dim})).eval()
    scheduler = PixNerdFlowMatchScheduler(**{"num_inference_steps": 2, "guidance_scale": 3.0, **scheduler_kwargs})
    text_encoder = tiny_qwen3(official_samples()[1]["qwen3_config"]) if with_text_encoder else None
    tokenizer = qwen3_tokenizer() if with_text_encoder else None
    pipe = PixNerdT2IPipeline(
        transformer=transformer, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, *args, seed=0, **kwargs) -> torch.Tensor:
    """The raw pixels (`output_type="latent"`, nominally in [-1, 1]) for a seed."""
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return pipe(*args, output_type="latent", **kwargs).images


def count_transformer_calls(pipe, monkeypatch) -> list[int]:
    """The batch size of every transformer call, recorded while the pipeline runs."""
    batch_sizes, forward = [], pipe.transformer.forward

    def spy(hidden_states, *args, **kwargs):
        batch_sizes.append(hidden_states.shape[0])
        return forward(hidden_states, *args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "forward", spy)
    return batch_sizes


# --------------------------------------------------------------------------------------- parity with the official code


@pytest.mark.parametrize(
    "run, solver_order, noise",
    [("c2i_euler", 1, "noise"), ("c2i_adams2", 2, "noise"), ("c2i_euler_32px", 1, "noise_32px")],
)
def test_c2i_sampling_matches_official_sampler(run, solver_order, noise):
    # c2i_euler_32px: twice the trained size (32 px from the 16 px model), on the official native grid by default.
    tensors, metadata = official_samples()
    settings = metadata["runs"][run]
    pipe = PixNerdPipeline.from_single_file(C2I_CKPT, sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PixNerdFlowMatchScheduler(shift=settings["timeshift"], solver_order=solver_order)
    call = dict(
        num_inference_steps=settings["num_steps"],
        guidance_scale=settings["guidance"],
        guidance_interval=tuple(settings["interval"]),
        latents=tensors[noise],
        output_type="latent",
    )
    images = pipe(tensors["class_labels"].tolist(), **call).images
    assert images.dtype == torch.float32 and images.shape == tensors[noise].shape
    assert relative_error(images, tensors[f"{run}.samples"]) < TOLERANCE
    if run == "c2i_euler_32px":  # the opt-in trained grid is another computation
        trained = pipe(tensors["class_labels"].tolist(), **call, trained_grid=True).images
        assert relative_error(trained, tensors[f"{run}.samples"]) > 1e-2


def test_t2i_sampling_from_prompt_embeds_matches_official_sampler():
    tensors, metadata = official_samples()
    settings = metadata["runs"]["t2i_adams2"]
    pipe = PixNerdT2IPipeline.from_single_file(T2I_CKPT, text_encoder=None, sample_size=16)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = PixNerdFlowMatchScheduler(shift=settings["timeshift"], solver_order=2)
    images = pipe(
        prompt_embeds=tensors["prompt_embeds"],
        negative_prompt_embeds=tensors["negative_prompt_embeds"],
        num_inference_steps=settings["num_steps"],
        guidance_scale=settings["guidance"],
        guidance_interval=tuple(settings["interval"]),
        latents=tensors["noise"],
        output_type="latent",
    ).images
    assert relative_error(images, tensors["t2i_adams2.samples"]) < TOLERANCE


def test_encode_prompt_matches_official_conditioner():
    tensors, metadata = official_samples()
    prompts, expected = metadata["prompts"], tensors["text_embeddings"]
    pipe = tiny_t2i_pipeline(with_text_encoder=True, text_embed_dim=metadata["text_embed_dim"])
    assert pipe.transformer.config.text_max_length == metadata["text_max_length"]
    # The fixture covers truncation and the zero padding of the 32-wide hidden state to 40.
    assert max(len(qwen3_tokenizer()(p).input_ids) for p in prompts) > metadata["text_max_length"]
    assert expected[..., 32:].abs().max() == 0 and expected[..., :32].abs().min() > 0

    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
    assert prompt_embeds.shape == expected.shape
    assert relative_error(prompt_embeds, expected) < TOLERANCE
    # The default unconditional embedding is the official one of "" for every prompt.
    empty = expected[prompts.index("")]
    assert relative_error(negative_prompt_embeds, empty.expand_as(expected)) < TOLERANCE


# --------------------------------------------------------------------------------------------------- sampling


def test_batched_and_one_by_one_sampling_agree():
    pipe = tiny_c2i_pipeline()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batched = sample(pipe, [1, 5, 10], generator=generators)
    for i, (label, seed) in enumerate([(1, 1), (5, 2), (10, 3)]):
        single = sample(pipe, label, generator=torch.Generator().manual_seed(seed))
        assert relative_error(batched[i : i + 1], single) < BATCH_TOLERANCE


def test_t2i_batched_and_one_by_one_sampling_agree():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    prompts = ["a red fox", "a cat on a mat"]
    batched = sample(pipe, prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    for i, prompt in enumerate(prompts):
        single = sample(pipe, prompt, generator=torch.Generator().manual_seed(i + 1))
        assert relative_error(batched[i : i + 1], single) < BATCH_TOLERANCE


def test_num_images_per_prompt_repeats_each_label():
    pipe = tiny_c2i_pipeline()
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    images = sample(pipe, [1, 2], num_images_per_prompt=2, generator=generators)
    assert images.shape == (4, 3, 16, 16)
    assert (images[0] - images[1]).abs().max() > 1e-2  # same label, other noise
    # Label-major order: [1, 1, 2, 2].
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    torch.testing.assert_close(images, sample(pipe, [1, 1, 2, 2], generator=generators))


def test_t2i_num_images_per_prompt_repeats_each_prompt():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    images = sample(pipe, ["a red fox", "a cat"], num_images_per_prompt=3)
    assert images.shape == (6, 3, 16, 16)
    assert (images[0] - images[1]).abs().max() > 1e-2
    reference = sample(pipe, ["a red fox"] * 3 + ["a cat"] * 3)
    torch.testing.assert_close(images, reference)


def test_same_seed_gives_same_image_and_other_seeds_differ():
    pipe = tiny_c2i_pipeline()
    first, again, other = sample(pipe, 3, seed=0), sample(pipe, 3, seed=0), sample(pipe, 3, seed=1)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2


def test_latent_output_is_raw_float32_pixels():
    pipe = tiny_c2i_pipeline()
    latent = sample(pipe, [1, 2])
    pt = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert latent.dtype == torch.float32 and latent.shape == (2, 3, 16, 16)
    assert latent.abs().max() > 1  # not clamped: the tiny random model leaves [-1, 1]
    torch.testing.assert_close(pt * 2 - 1, latent.clamp(-1, 1), atol=1e-6, rtol=0)


def test_pt_and_np_outputs_are_images_in_unit_range():
    pipe = tiny_c2i_pipeline()
    expected = (sample(pipe, [1, 2], height=16, width=8) / 2 + 0.5).clamp(0, 1)  # (B, 3, H, W)
    kwargs = dict(height=16, width=8)
    pt = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs).images
    np_images = pipe([1, 2], generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    assert pt.shape == (2, 3, 16, 8) and pt.min() >= 0 and pt.max() <= 1
    torch.testing.assert_close(pt, expected)
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 16, 8, 3)
    assert np_images.dtype == np.float32
    np.testing.assert_allclose(np_images, expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_pil_output_has_the_requested_size():
    pipe = tiny_c2i_pipeline()
    expected = (sample(pipe, [1, 2], height=16, width=8) / 2 + 0.5).clamp(0, 1)
    images = pipe([1, 2], height=16, width=8, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and all(isinstance(im, PIL.Image.Image) for im in images)
    assert images[0].size == (8, 16) and images[0].mode == "RGB"
    pixels = np.stack([np.asarray(im) for im in images])
    expected = (expected.permute(0, 2, 3, 1).numpy() * 255).round()
    assert np.abs(pixels.astype(np.float32) - expected).max() <= 1


def test_class_labels_as_tensor_list_or_int_agree():
    pipe = tiny_c2i_pipeline()
    expected = sample(pipe, [4, 7])
    assert torch.equal(sample(pipe, torch.tensor([4, 7])), expected)
    assert torch.equal(sample(pipe, (4, 7)), expected)
    assert torch.equal(sample(pipe, 4), sample(pipe, [4]))


def test_return_dict_false_gives_tuple():
    pipe = tiny_c2i_pipeline()
    (images,) = pipe(4, generator=torch.Generator().manual_seed(0), output_type="latent", return_dict=False)
    assert torch.equal(images, sample(pipe, 4))


def test_callback_reads_and_replaces_latents():
    pipe = tiny_c2i_pipeline()
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, float(timestep), callback_kwargs["latents"].clone()))
        return {}

    images = sample(pipe, [1, 2], num_inference_steps=3, callback_on_step_end=callback)
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == pipe.scheduler.timesteps.tolist()
    assert torch.equal(seen[-1][2], images)  # the latents after the last step are the output

    def zero_last(pipeline, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 2 else {}

    images = pipe(
        [1, 2],
        num_inference_steps=3,
        callback_on_step_end=zero_last,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.equal(images, torch.full((2, 3, 16, 16), 0.5))


def test_callback_replacing_latents_midway_changes_the_rest():
    pipe = tiny_c2i_pipeline(solver_order=1)  # Euler: no history of model outputs from before the replacement

    def zero_first(pipeline, step, timestep, callback_kwargs):
        return {"latents": torch.zeros_like(callback_kwargs["latents"])} if step == 0 else {}

    images = sample(pipe, [1, 2], num_inference_steps=3, callback_on_step_end=zero_first)
    # After step 0 both samples start from zeros: the noise no longer matters, the label still does.
    other_seed = sample(pipe, [1, 2], num_inference_steps=3, callback_on_step_end=zero_first, seed=5)
    torch.testing.assert_close(images, other_seed)
    assert (images[0] - images[1]).abs().max() > 1e-2


def test_guidance_skipped_outside_interval(monkeypatch):
    pipe = tiny_c2i_pipeline(shift=1.0)
    batch_sizes = count_transformer_calls(pipe, monkeypatch)
    pipe([1, 2], num_inference_steps=4, guidance_scale=3.0, guidance_interval=(0.3, 1.0), output_type="latent")
    # t = 0, 0.25, 0.5, 0.75: guidance only where 0.3 < t < 1.
    assert batch_sizes == [2, 2, 4, 4]


def test_guidance_scale_one_runs_the_conditional_pass_only(monkeypatch):
    pipe = tiny_c2i_pipeline()
    batch_sizes = count_transformer_calls(pipe, monkeypatch)
    images = sample(pipe, [1, 2], num_inference_steps=4, guidance_scale=1.0)
    assert batch_sizes == [2, 2, 2, 2]
    # With guidance on, the result changes.
    assert (images - sample(pipe, [1, 2], num_inference_steps=4, guidance_scale=3.0)).abs().max() > 1e-3


def test_t2i_guidance_skipped_outside_interval(monkeypatch):
    pipe = tiny_t2i_pipeline(with_text_encoder=True, shift=1.0)
    batch_sizes = count_transformer_calls(pipe, monkeypatch)
    pipe("a red fox", num_inference_steps=4, guidance_interval=(0.3, 0.6), output_type="latent")
    assert batch_sizes == [1, 1, 2, 1]


def test_guidance_interval_argument_overrides_scheduler_config(monkeypatch):
    pipe = tiny_c2i_pipeline(shift=1.0, guidance_interval_min=0.0, guidance_interval_max=1.0)
    batch_sizes = count_transformer_calls(pipe, monkeypatch)
    overridden = sample(pipe, [1, 2], num_inference_steps=4, guidance_interval=(0.3, 1.0))
    assert batch_sizes == [2, 2, 4, 4]
    batch_sizes.clear()
    default = sample(pipe, [1, 2], num_inference_steps=4)
    assert batch_sizes == [2, 4, 4, 4]  # the config's (0, 1): only t = 0 is unguided
    configured = tiny_c2i_pipeline(shift=1.0, guidance_interval_min=0.3, guidance_interval_max=1.0)
    torch.testing.assert_close(overridden, sample(configured, [1, 2], num_inference_steps=4))
    assert (overridden - default).abs().max() > 1e-3
    as_tensor = sample(pipe, [1, 2], num_inference_steps=4, guidance_interval=torch.tensor([0.3, 1.0]))
    torch.testing.assert_close(as_tensor, overridden)  # a tensor pair is taken like a tuple


def test_defaults_come_from_the_scheduler_config(monkeypatch):
    pipe = tiny_c2i_pipeline(num_inference_steps=3, guidance_scale=2.0, guidance_interval_min=0.5)
    batch_sizes = count_transformer_calls(pipe, monkeypatch)
    images = sample(pipe, [1, 2])
    assert batch_sizes == [2, 2, 4]  # 3 steps, t = 0, 1/3, 2/3: guided only above 0.5
    explicit = sample(pipe, [1, 2], num_inference_steps=3, guidance_scale=2.0, guidance_interval=(0.5, 1.0))
    assert torch.equal(images, explicit)


def test_unconditional_class_id_is_the_null_class():
    pipe = tiny_c2i_pipeline()
    null = sample(pipe, 10, guidance_scale=1.0)
    labelled = sample(pipe, 3, guidance_scale=1.0)
    assert null.shape == (1, 3, 16, 16) and (null - labelled).abs().max() > 1e-2
    # Guidance between the null class and itself is no guidance.
    torch.testing.assert_close(sample(pipe, 10, guidance_scale=4.0), null, atol=1e-5, rtol=1e-5)


def test_runs_with_flow_match_euler_discrete_scheduler():
    pipe = tiny_c2i_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    images = sample(pipe, [1, 2], num_inference_steps=3, guidance_scale=3.0)
    assert torch.isfinite(images).all() and images.shape == (2, 3, 16, 16)
    assert torch.equal(images, sample(pipe, [1, 2], num_inference_steps=3, guidance_scale=3.0))


def test_flow_match_euler_discrete_equals_pixnerd_euler_on_its_sigmas():
    reference = FlowMatchEulerDiscreteScheduler()
    reference.set_timesteps(3)
    pipe = tiny_c2i_pipeline()
    pipe.scheduler = reference
    expected = sample(pipe, [1, 2], num_inference_steps=3, guidance_scale=3.0)

    scheduler = PixNerdFlowMatchScheduler(solver_order=1)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda num_inference_steps=None, device=None: set_timesteps(
        device=device, sigmas=reference.sigmas[:-1]
    )
    pipe.scheduler = scheduler
    assert relative_error(sample(pipe, [1, 2], num_inference_steps=3, guidance_scale=3.0), expected) < TOLERANCE


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(class_labels="kity"), r"Unknown class name 'kity'.*Close matches: \['kitty'\]"),
        (dict(class_labels=["dog", "doge"]), r"Unknown class name 'doge'.*\['dog'\]"),
        (dict(class_labels=11), r"`class_labels`.*\[0, 10\].*11"),
        (dict(class_labels=[1, -1]), r"`class_labels`.*-1"),
        (dict(class_labels=[]), r"`class_labels`"),
        (dict(class_labels=1, height=10), r"`height` and `width`.*4.*\(10, 16\)"),
        (dict(class_labels=1, width=-4), r"`height` and `width`.*\(16, -4\)"),
        (dict(class_labels=1, num_inference_steps=0), r"`num_inference_steps`.*0"),
        (dict(class_labels=1, num_images_per_prompt=0), r"`num_images_per_prompt`.*0"),
        (dict(class_labels=1, output_type="jpg"), r"`output_type`.*'jpg'"),
        (dict(class_labels=[1, 2], latents=torch.zeros(1, 3, 16, 16)), r"`latents`.*\(2, 3, 16, 16\)"),
        (dict(class_labels=[1, 2], generator=[torch.Generator()]), r"`generator`.*1.*\(2\)"),
        (dict(class_labels=1, num_images_per_prompt=2, generator=[torch.Generator()]), r"`generator`"),
        (dict(class_labels=1, guidance_interval=(0.5, 0.2)), r"`guidance_interval`.*\(0.5, 0.2\)"),
        (dict(class_labels=1, guidance_interval=(-0.1, 1.0)), r"`guidance_interval`.*\(-0.1, 1.0\)"),
        (dict(class_labels=1, guidance_interval=(0.0, 1.5)), r"`guidance_interval`.*\(0.0, 1.5\)"),
        (dict(class_labels=1, guidance_interval=(0.1, 0.5, 0.9)), r"`guidance_interval`"),
        (dict(class_labels=1, callback_on_step_end_tensor_inputs=["noise_pred"]), r"`callback_on_step_end_tensor"),
    ],
)
def test_c2i_bad_input_raises_value_error_naming_it(kwargs, match):
    pipe = tiny_c2i_pipeline(id2label=LABELS)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_class_names_need_id2label():
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match=r"Unknown class name 'dog'.*no `id2label`"):
        pipe("dog")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt="a fox", prompt_embeds=torch.zeros(1, 6, 24)), r"`prompt` and `prompt_embeds`"),
        (dict(), r"`prompt` and `prompt_embeds`"),
        (dict(prompt=3), r"`prompt`.*int"),
        (dict(prompt=[]), r"`prompt`"),
        (dict(prompt=["a", "b"], negative_prompt=["c"]), r"`negative_prompt`.*1.*2"),
        (dict(prompt="a", negative_prompt=5), r"`negative_prompt` must be a string or a list of strings, got int"),
        (dict(prompt="a", negative_prompt=["b", None]), r"`negative_prompt` must be a string or a list"),
        (dict(prompt="a", negative_prompt=("b",)), r"`negative_prompt` must be a string or a list.*tuple"),
        (dict(prompt="a", negative_prompt="b", negative_prompt_embeds=torch.zeros(1, 6, 24)), r"`negative_prompt`"),
        (
            dict(prompt_embeds=torch.zeros(2, 6, 24), negative_prompt_embeds=torch.zeros(1, 6, 24)),
            r"`negative_prompt_embeds`.*\(2, 6, 24\).*\(1, 6, 24\)",
        ),
        (dict(prompt_embeds=torch.zeros(1, 5, 24)), r"`prompt_embeds`.*\(1, 6, 24\)"),
        (dict(prompt="a", max_sequence_length=8), r"`max_sequence_length`.*6.*8"),
        (dict(prompt=["a", "b"], latents=torch.zeros(1, 3, 16, 16)), r"`latents`"),
        (dict(prompt=["a", "b"], generator=[torch.Generator()] * 3), r"`generator`"),
        (dict(prompt="a", height=18), r"`height` and `width`"),
        (dict(prompt="a", guidance_interval=(0.5, 0.2)), r"`guidance_interval`"),
        (dict(prompt="a", guidance_interval=(0.1, 0.5, 0.9)), r"`guidance_interval` must be a pair"),
        (dict(prompt="a", guidance_interval=torch.tensor([0.5, 0.2])), r"`guidance_interval`"),
        (dict(prompt="a", num_inference_steps=0), r"`num_inference_steps`"),
        (dict(prompt="a", output_type="jpg"), r"`output_type`"),
    ],
)
def test_t2i_bad_input_raises_value_error_naming_it(kwargs, match):
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_prompt_without_text_encoder_raises():
    pipe = tiny_t2i_pipeline()
    with pytest.raises(ValueError, match=r"no `text_encoder`/`tokenizer`"):
        pipe("a red fox")
    # With guidance on, the unconditional embedding needs the encoder too.
    with pytest.raises(ValueError, match=r"`negative_prompt_embeds`"):
        pipe(prompt_embeds=torch.zeros(1, 6, 24), guidance_scale=3.0)


def test_prompt_embeds_without_text_encoder_run_unguided():
    pipe = tiny_t2i_pipeline()
    embeds = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(0))
    images = sample(pipe, prompt_embeds=embeds, guidance_scale=1.0)
    assert images.shape == (2, 3, 16, 16)
    assert (images - sample(pipe, prompt_embeds=-embeds, guidance_scale=1.0)).abs().max() > 1e-3


def test_prompt_and_its_embeddings_give_the_same_image():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(["a red fox"], negative_prompt="blurry")
    from_embeds = sample(pipe, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
    from_text = sample(pipe, "a red fox", negative_prompt="blurry")
    assert torch.equal(from_embeds, from_text)
    assert (from_text - sample(pipe, "a red fox")).abs().max() > 1e-3  # the negative prompt matters


def test_negative_prompt_list_encodes_one_per_prompt():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    _, negative = pipe.encode_prompt(["a", "b"], negative_prompt=["blurry", "dark"])
    _, blurry = pipe.encode_prompt(["a"], negative_prompt="blurry")
    _, dark = pipe.encode_prompt(["b"], negative_prompt="dark")
    torch.testing.assert_close(negative, torch.cat([blurry, dark]))


# -------------------------------------------------------------------------------------------------- save and load


def test_c2i_save_load_round_trip(tmp_path):
    pipe = tiny_c2i_pipeline(id2label=LABELS)
    expected = sample(pipe, ["dog", 3])
    pipe.save_pretrained(tmp_path)

    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "PixNerdPipeline" and model_index["id2label"] == LABELS
    card = (tmp_path / "README.md").read_text()
    assert "library_name: diffusers" in card and "- pixnerd" in card and "- diffusers-pixnerd" in card
    assert "from diffusers_pixnerd import PixNerdPipeline" in card and "PixNerdPipeline.from_pretrained(" in card

    for loader in (PixNerdPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is PixNerdPipeline and loaded.get_label_ids("kitty") == [0]
        assert loaded.scheduler.config.num_inference_steps == 2
        # Equal up to rounding: loaded weights are memory-mapped at other alignments, which changes BLAS paths.
        assert relative_error(sample(loaded, ["dog", 3]), expected) < TOLERANCE


@pytest.mark.parametrize("text", [False, True], ids=["c2i", "t2i"])
def test_diffusers_loads_a_saved_folder_without_importing_the_package(tmp_path, text):
    """A fresh interpreter that never imports diffusers_pixnerd: `DiffusionPipeline.from_pretrained` with the custom
    pipeline file saved beside the weights (diffusers then imports the installed package itself)."""
    pipe = tiny_t2i_pipeline() if text else tiny_c2i_pipeline(id2label=LABELS)
    embeds = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(0))
    condition = dict(prompt_embeds=embeds, negative_prompt_embeds=-embeds) if text else dict(class_labels=[3])
    expected = sample(pipe, **condition)
    folder = tmp_path / "pipe"
    pipe.save_pretrained(folder)
    assert f"import {type(pipe).__name__}" in (folder / "pipeline_pixnerd.py").read_text()
    assert 'custom_pipeline="pipeline_pixnerd", trust_remote_code=True' in (folder / "README.md").read_text()
    torch.save(condition, tmp_path / "condition.pt")
    script = f"""
import sys, torch
torch.set_num_threads(1)
from diffusers import DiffusionPipeline
assert "diffusers_pixnerd" not in sys.modules
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, custom_pipeline="pipeline_pixnerd", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
condition = torch.load({str(tmp_path / "condition.pt")!r})
images = pipe(**condition, generator=torch.Generator().manual_seed(0), output_type="latent").images
torch.save(images, {str(tmp_path / "images.pt")!r})
print(type(pipe).__module__, type(pipe).__name__)
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == type(pipe).__name__
    assert relative_error(torch.load(tmp_path / "images.pt"), expected) < TOLERANCE
    # Without trust_remote_code diffusers refuses, naming the flag; our own loader needs neither.
    refused = subprocess.run(
        [sys.executable, "-c", script.replace(", trust_remote_code=True", "")], env=env, capture_output=True, text=True
    )
    assert refused.returncode != 0 and "trust_remote_code=True" in refused.stderr
    assert type(type(pipe).from_pretrained(folder)) is type(pipe)


def test_t2i_save_load_round_trip_with_text_encoder(tmp_path):
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    expected = sample(pipe, ["a red fox", ""], negative_prompt="blurry")
    pipe.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "PixNerdT2IPipeline.from_pretrained(" in card
    assert {"text_encoder", "tokenizer", "transformer", "scheduler"} <= set(os.listdir(tmp_path))

    for loader in (PixNerdT2IPipeline, DiffusionPipeline):
        loaded = loader.from_pretrained(tmp_path)
        loaded.set_progress_bar_config(disable=True)
        assert type(loaded) is PixNerdT2IPipeline
        assert relative_error(sample(loaded, ["a red fox", ""], negative_prompt="blurry"), expected) < TOLERANCE


def test_t2i_save_load_round_trip_without_text_encoder(tmp_path):
    pipe = tiny_t2i_pipeline()
    embeds = torch.randn(1, 6, 24, generator=torch.Generator().manual_seed(0))
    expected = sample(pipe, prompt_embeds=embeds, negative_prompt_embeds=-embeds)
    pipe.save_pretrained(tmp_path)
    loaded = PixNerdT2IPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert relative_error(sample(loaded, prompt_embeds=embeds, negative_prompt_embeds=-embeds), expected) < TOLERANCE


def test_push_to_hub_uploads_the_saved_pipeline(monkeypatch):
    pipe = tiny_c2i_pipeline(id2label=LABELS)
    uploads, created = [], []

    def create_repo(repo_id, private=None, token=None, exist_ok=False):
        created.append((repo_id, private, token, exist_ok))
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, subfolder=None):
        files = sorted(str(p.relative_to(working_dir)) for p in Path(working_dir).rglob("*") if p.is_file())
        readme = (Path(working_dir) / "README.md").read_text()
        uploads.append(dict(files=files, readme=readme, repo_id=repo_id, commit_message=commit_message, token=token))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr("diffusers_pixnerd.pipelines.pipeline_utils.create_repo", create_repo)
    monkeypatch.setattr(PixNerdPipeline, "_upload_folder", upload_folder)

    url = pipe.push_to_hub("user/tiny-pixnerd", commit_message="tiny", private=True, token="hf_fake")
    assert url == "https://huggingface.co/user/tiny-pixnerd/commit/0"
    assert created == [("user/tiny-pixnerd", True, "hf_fake", True)]
    (upload,) = uploads
    assert upload["repo_id"] == "user/tiny-pixnerd" and upload["commit_message"] == "tiny"
    assert upload["token"] == "hf_fake"
    assert {
        "model_index.json",
        "README.md",
        "scheduler/scheduler_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
    } <= set(upload["files"])
    assert 'PixNerdPipeline.from_pretrained("user/tiny-pixnerd")' in upload["readme"]


def test_save_pretrained_with_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    pipe = tiny_c2i_pipeline()
    uploaded = []
    monkeypatch.setattr(
        "diffusers_pixnerd.pipelines.pipeline_utils.create_repo",
        lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id),
    )
    monkeypatch.setattr(
        PixNerdPipeline, "_upload_folder", lambda self, folder, repo_id, **kw: uploaded.append((folder, repo_id))
    )
    pipe.save_pretrained(tmp_path / "my-pixnerd", push_to_hub=True)
    assert uploaded == [(tmp_path / "my-pixnerd", "my-pixnerd")]
    assert 'from_pretrained("my-pixnerd")' in (tmp_path / "my-pixnerd" / "README.md").read_text()


# ------------------------------------------------------------------------------------------------------------ LoRA


def add_lora(pipe, seed=1) -> dict:
    """A random LoRA (A and B non-zero) on the attention and neural-field layers; the `save_lora_weights` kwargs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "param_generator"],
        init_lora_weights=False,
    )
    pipe.transformer.add_adapter(config)
    # The metadata keeps lora_alpha (scale alpha / r = 2); without it diffusers assumes alpha = r.
    return dict(
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A LoRA of the tiny C2I transformer in diffusers' format, and the pipeline output with it applied."""
    pipe = tiny_c2i_pipeline()
    folder = tmp_path_factory.mktemp("lora")
    PixNerdPipeline.save_lora_weights(folder, **add_lora(pipe))
    return folder, sample(pipe, [1, 2])


def test_load_lora_weights_changes_output_to_the_adapter_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    original = sample(pipe, [1, 2])
    pipe.load_lora_weights(folder, adapter_name="style")
    loaded = sample(pipe, [1, 2])
    assert relative_error(loaded, with_lora) < TOLERANCE
    assert (loaded - original).abs().max() > 1e-2


def test_fuse_lora_keeps_the_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    pipe.load_lora_weights(folder, adapter_name="style")
    original = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.clone()
    pipe.fuse_lora()
    fused = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert (fused - original).abs().max() > 1e-3  # merged into the weights
    assert relative_error(sample(pipe, [1, 2]), with_lora) < TOLERANCE


def test_unfuse_and_unload_lora_restore_the_original_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    original = sample(pipe, [1, 2])
    pipe.load_lora_weights(folder, adapter_name="style")
    pipe.fuse_lora()
    pipe.unfuse_lora()
    assert relative_error(sample(pipe, [1, 2]), with_lora) < TOLERANCE
    pipe.unload_lora_weights()
    assert relative_error(sample(pipe, [1, 2]), original) < TOLERANCE


def test_set_adapters_weight_zero_gives_the_original_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    original = sample(pipe, [1, 2])
    pipe.load_lora_weights(folder, adapter_name="style")
    pipe.set_adapters("style", 0.0)
    assert relative_error(sample(pipe, [1, 2]), original) < TOLERANCE
    pipe.set_adapters("style", 1.0)
    assert relative_error(sample(pipe, [1, 2]), with_lora) < TOLERANCE


# ------------------------------------------------------------------------------------------ official checkpoints


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


def test_convert_cli_writes_a_loadable_pipeline_folder(tmp_path, monkeypatch, capsys):
    output = tmp_path / "pipe"
    argv = ["convert", "--pipeline", "--checkpoint", C2I_CKPT, "--output", str(output), "--sample_size", "16"]
    monkeypatch.setattr(sys, "argv", argv)
    # `python -m diffusers_pixnerd.convert` in this interpreter (a subprocess would spend seconds importing diffusers).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
        runpy.run_module("diffusers_pixnerd.convert", run_name="__main__", alter_sys=True)
    assert "Wrote the PixNerdPipeline folder" in capsys.readouterr().out
    assert {"model_index.json", "README.md", "transformer", "scheduler"} <= set(os.listdir(output))
    pipe = PixNerdPipeline.from_pretrained(output)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.num_inference_steps == 100 and pipe.scheduler.config.solver_order == 1
    expected = sample(PixNerdPipeline.from_single_file(C2I_CKPT, sample_size=16), [1, 2], num_inference_steps=2)
    assert relative_error(sample(pipe, [1, 2], num_inference_steps=2), expected) < TOLERANCE


# ------------------------------------------------------------------------------------------------- class names


@pytest.fixture(scope="module")
def imagenet_pipeline():
    return tiny_c2i_pipeline(id2label=imagenet_id2label(), num_classes=1000)


@pytest.mark.parametrize(
    "name, class_id",
    [
        ("golden retriever", 207),
        ("tench", 0),
        ("Tinca tinca", 0),
        ("goldfish", 1),
        ("Carassius auratus", 1),
        ("toilet paper", 999),
    ],
)
def test_get_label_ids_maps_imagenet_names_and_synonyms(imagenet_pipeline, name, class_id):
    assert imagenet_pipeline.get_label_ids(name) == [class_id]


def test_get_label_ids_of_a_list_keeps_the_order(imagenet_pipeline):
    assert imagenet_pipeline.get_label_ids(["goldfish", "golden retriever", "tench"]) == [1, 207, 0]


def test_unknown_imagenet_name_suggests_close_matches(imagenet_pipeline):
    with pytest.raises(
        ValueError, match=r"Unknown class name 'golden retreiver'.*1\d\d\d known names.*golden retriever"
    ):
        imagenet_pipeline.get_label_ids("golden retreiver")


def test_class_names_sample_like_their_ids(imagenet_pipeline):
    imagenet_pipeline.set_progress_bar_config(disable=True)
    by_name = sample(imagenet_pipeline, ["golden retriever", "tench"], seed=3)
    assert torch.equal(by_name, sample(imagenet_pipeline, [207, 0], seed=3))


def test_package_registers_pipelines_in_diffusers_namespace():
    import diffusers

    assert diffusers.PixNerdPipeline is PixNerdPipeline and diffusers.PixNerdT2IPipeline is PixNerdT2IPipeline
    assert diffusers_pixnerd.PixNerdTransformer2DModel is diffusers.PixNerdTransformer2DModel
