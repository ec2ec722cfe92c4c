"""PixNerdPipeline (pipelines/pipeline_pixnerd.py), the class-conditional pipeline: official parity, sampling,
custom sigmas, callbacks and the sampling state, DiT's shapes of class labels, the image size, bad input, saving and
the Hub, ImageNet class names."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdTransformer2DModel, imagenet_id2label
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I

from ..helpers import (
    BATCH_TOLERANCE,
    C2I_CKPT,
    LABELS,
    TOLERANCE,
    count_transformer_calls,
    official_samples,
    own_sigmas,
    relative_error,
    sample,
    tiny_c2i_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")


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


# ------------------------------------------------------------------------------------------------------------ sampling


def test_batched_and_one_by_one_sampling_agree():
    pipe = tiny_c2i_pipeline()
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    batched = sample(pipe, [1, 5, 10], generator=generators)
    for i, (label, seed) in enumerate([(1, 1), (5, 2), (10, 3)]):
        single = sample(pipe, label, generator=torch.Generator().manual_seed(seed))
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


def test_guidance_interval_as_a_list_array_or_tensor_samples_like_a_tuple():
    pipe = tiny_c2i_pipeline()
    expected = sample(pipe, [1], guidance_interval=(0.25, 1.0))
    for interval in ([0.25, 1.0], np.array([0.25, 1.0]), torch.tensor([0.25, 1.0])):
        assert torch.equal(sample(pipe, [1], guidance_interval=interval), expected)


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


def test_numpy_integers_are_taken_wherever_python_ints_are():
    pipe = tiny_c2i_pipeline()
    expected = sample(pipe, class_labels=[1], num_inference_steps=2, num_images_per_prompt=1, height=16, width=16)
    got = sample(
        pipe,
        class_labels=[np.int64(1)],
        num_inference_steps=np.int32(2),
        num_images_per_prompt=np.int64(1),
        height=np.int64(16),
        width=np.int16(16),
        guidance_scale=np.float32(3.0),
    )
    torch.testing.assert_close(got, expected)


# -------------------------------------------------------------------------------------------------------------- sigmas


@pytest.mark.parametrize("num_inference_steps", [2, 4])
def test_c2i_sigmas_of_the_scheduler_grid_give_the_default_image(num_inference_steps):
    pipe = tiny_c2i_pipeline()
    expected = sample(pipe, [1, 2], num_inference_steps=num_inference_steps)
    timesteps = pipe.scheduler.timesteps.clone()
    sigmas = own_sigmas(pipe, num_inference_steps)
    for given in (sigmas, sigmas.tolist(), sigmas.numpy()):
        assert torch.equal(sample(pipe, [1, 2], sigmas=given), expected)
        assert torch.equal(pipe.scheduler.timesteps, timesteps) and pipe.num_timesteps == num_inference_steps
    # `num_inference_steps` that agrees with the sigmas may be given too.
    assert torch.equal(sample(pipe, [1, 2], sigmas=sigmas, num_inference_steps=num_inference_steps), expected)


def test_sigmas_with_flow_match_euler_discrete_scheduler():
    reference = FlowMatchEulerDiscreteScheduler()
    reference.set_timesteps(3)
    pipe = tiny_c2i_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    expected = sample(pipe, [1, 2], num_inference_steps=3)
    assert torch.equal(sample(pipe, [1, 2], sigmas=reference.sigmas[:-1]), expected)
    assert (sample(pipe, [1, 2], sigmas=[1.0, 0.6, 0.2]) - expected).abs().max() > 1e-3


def test_sigmas_and_a_different_num_inference_steps_are_an_error():
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match=r"`num_inference_steps` \(3\) must equal `len\(sigmas\)` \(2\)"):
        sample(pipe, [1], sigmas=[1.0, 0.5], num_inference_steps=3)


def test_sigmas_with_a_scheduler_that_takes_none_are_an_error():
    pipe = tiny_c2i_pipeline()
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda num_inference_steps=None, device=None: set_timesteps(
        num_inference_steps, device
    )
    with pytest.raises(ValueError, match=r"`sigmas`: the scheduler PixNerdFlowMatchScheduler takes no custom sigmas"):
        sample(pipe, [1], sigmas=[1.0, 0.5])


# ------------------------------------------------------------------------------------ callbacks and the sampling state


def test_callback_sees_current_timestep_and_the_call_state():
    pipe = tiny_c2i_pipeline()
    assert pipe.current_timestep is None and pipe.num_timesteps is None and not pipe.interrupt
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        assert pipeline is pipe
        seen.append(
            (
                pipeline.current_timestep,
                timestep,
                pipeline.num_timesteps,
                pipeline.guidance_scale,
                pipeline.do_classifier_free_guidance,
                pipeline.attention_kwargs,
                pipeline.interrupt,
            )
        )
        return {}

    attention_kwargs = {"scale": 1.0}
    sample(
        pipe,
        [1, 2],
        num_inference_steps=3,
        guidance_scale=2.5,
        attention_kwargs=attention_kwargs,
        callback_on_step_end=callback,
    )
    assert len(seen) == 3
    for step, (current, timestep, num_timesteps, scale, guided, kwargs, interrupt) in enumerate(seen):
        assert isinstance(current, torch.Tensor) and torch.equal(current, timestep)
        assert torch.equal(current, pipe.scheduler.timesteps[step])
        assert (num_timesteps, scale, guided, kwargs, interrupt) == (3, 2.5, True, attention_kwargs, False)
    assert pipe.current_timestep is None
    assert (pipe.num_timesteps, pipe.guidance_scale, pipe.attention_kwargs) == (3, 2.5, attention_kwargs)


def test_current_timestep_is_none_after_a_failing_call():
    pipe = tiny_c2i_pipeline()

    def failing(pipeline, step, timestep, callback_kwargs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        sample(pipe, [1], callback_on_step_end=failing)
    assert pipe.current_timestep is None


def test_interrupt_skips_the_remaining_steps():
    pipe = tiny_c2i_pipeline()
    calls = []
    forward = pipe.transformer.forward
    pipe.transformer.forward = lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs)

    def stop(pipeline, step, timestep, callback_kwargs):
        pipeline._interrupt = True
        return {}

    images = sample(pipe, [1], num_inference_steps=4, callback_on_step_end=stop)
    assert len(calls) == 1 and images.shape == (1, 3, 16, 16)


def test_c2i_callback_tensor_inputs_are_the_latents_only():
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match=r"`callback_on_step_end_tensor_inputs` must be in \['latents'\]"):
        sample(pipe, [1], callback_on_step_end=lambda *args: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_a_callback_that_returns_no_dict_is_named():
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match="`callback_on_step_end` must return a dict .*got NoneType"):
        sample(pipe, class_labels=[1], callback_on_step_end=lambda pipe, i, t, kwargs: None)


# -------------------------------------------------------------------------------------------------------- class labels


@pytest.mark.parametrize(
    "class_labels",
    [
        (3, 5),
        np.array([3, 5]),
        np.array([3, 5], dtype=np.int32),
        [np.int64(3), np.int16(5)],
        torch.tensor([3, 5]),
        torch.tensor([[3], [5]]),
        [[3], [5]],
        [(3,), [5]],
        [torch.tensor(3), torch.tensor([5])],
        [np.array([3]), np.int64(5)],
        ["goldfish", 5],
        [["goldfish"], [5]],
        np.array([[3], [5]]),
    ],
    ids=repr,
)
def test_class_labels_in_every_dit_shape_give_the_same_images(class_labels):
    pipe = tiny_c2i_pipeline(id2label={**LABELS, "5": "five"})
    assert torch.equal(sample(pipe, class_labels), sample(pipe, [3, 5]))


@pytest.mark.parametrize(
    "class_labels", [3, np.int64(3), torch.tensor(3), torch.tensor([3]), [[3]], np.array([3]), "goldfish"], ids=repr
)
def test_a_single_class_label_in_every_shape_gives_the_same_image(class_labels):
    pipe = tiny_c2i_pipeline(id2label=LABELS)
    assert torch.equal(sample(pipe, class_labels), sample(pipe, [3]))


@pytest.mark.parametrize(
    "class_labels",
    [
        [[3, 4]],
        [[3], [4, 5]],
        [[]],
        [[[3]]],
        torch.tensor([[3, 4]]),
        np.array([[3, 4]]),
        [3.0],
        torch.tensor([3.0]),
        [True],
        [None],
    ],
    ids=repr,
)
def test_bad_class_labels_are_a_value_error_naming_them(class_labels):
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match=r"`class_labels`"):
        pipe(class_labels, output_type="latent")


# ---------------------------------------------------------------------------------------------------------- image size


@pytest.mark.parametrize("height, width", [(24, 24), (24, 16)])
def test_c2i_latents_set_the_image_size(height, width):
    pipe = tiny_c2i_pipeline()
    assert height % pipe.transformer.resolution_multiple == 0 and width % pipe.transformer.resolution_multiple == 0
    latents = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0))
    images = sample(pipe, [1, 2], latents=latents)
    assert images.shape == (2, 3, height, width)
    assert torch.equal(images, sample(pipe, [1, 2], latents=latents, height=height, width=width))
    assert torch.equal(images, sample(pipe, [1, 2], latents=latents, height=height))  # the other from the latents
    pil = pipe([1, 2], latents=latents).images
    assert pil[0].size == (width, height)


def test_latents_of_a_size_the_model_cannot_take_are_an_error():
    latents = torch.randn(1, 3, 18, 24)
    with pytest.raises(ValueError, match=r"`height` and `width` must be positive multiples of 4, got \(18, 24\)"):
        sample(tiny_c2i_pipeline(), [1], latents=latents)


@pytest.mark.parametrize("trained_grid", [False, True])
def test_c2i_pipeline_samples_other_sizes_on_the_native_grid_unless_asked(trained_grid):
    # One Euler step from sigma 1 to 0 without guidance: image = noise - v(noise), v on the grid asked for (the native
    # grid by default, as the official sampler; the parity at 32 px is test_c2i_sampling_matches_official_sampler).
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


# ----------------------------------------------------------------------------------------------------------- bad input


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


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "7", [3.0], torch.tensor(3.0)])
def test_guidance_scale_must_be_a_finite_number(scale):
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number"):
        sample(pipe, class_labels=[1], guidance_scale=scale)


def test_a_non_finite_guidance_scale_in_the_scheduler_config_is_an_error():
    pipe = tiny_c2i_pipeline()
    pipe.scheduler.register_to_config(guidance_scale=math.nan)  # e.g. an edited scheduler_config.json
    with pytest.raises(ValueError, match="`guidance_scale` must be a finite number, got nan .*scheduler config"):
        sample(pipe, class_labels=[1])


def test_latents_with_nan_or_inf_are_an_error():
    pipe = tiny_c2i_pipeline()
    latents = torch.zeros(1, 3, 16, 16)
    latents[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="`latents` contain NaN or infinite values"):
        sample(pipe, class_labels=[1], latents=latents)


def test_latents_as_a_numpy_array_are_named():
    pipe = tiny_c2i_pipeline()
    with pytest.raises(
        ValueError, match=r"`latents` must be a torch.Tensor \(e.g. `torch.from_numpy\(array\)`\), got ndarray"
    ):
        sample(pipe, class_labels=[1], latents=np.zeros((1, 3, 16, 16), np.float32))
    latents = torch.zeros(1, 3, 16, 16)
    assert torch.equal(
        sample(pipe, class_labels=[1], latents=latents), sample(pipe, class_labels=[1], latents=latents)
    )


@pytest.mark.parametrize("height", [16.0, "16", 16.5])
def test_a_height_that_is_not_an_integer_is_named(height):
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match="`height` and `width` must be integers"):
        sample(pipe, class_labels=[1], height=height)


@pytest.mark.parametrize("generator", [0, [0], [torch.Generator(), 1]], ids=repr)
def test_a_seed_given_as_generator_is_named(generator):
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match=r"`generator` must be a torch.Generator .*got (a list holding )?int"):
        pipe([1] * (len(generator) if isinstance(generator, list) else 1), generator=generator, output_type="latent")


@pytest.mark.parametrize("id2label", [["cat", "dog"], ("cat", "dog"), "cat"], ids=repr)
def test_id2label_that_is_not_a_dict_is_named(id2label):
    with pytest.raises(ValueError, match=r"`id2label` must be a dict of class names.*got a (list|tuple|str)"):
        tiny_c2i_pipeline(id2label=id2label)


@pytest.mark.parametrize(
    "id2label, message",
    [({"zero": "cat"}, "keys must be class ids"), ({"11": "cat"}, "keys must be class ids"), ({"0": 3}, "values")],
)
def test_bad_id2label_is_named(id2label, message):
    with pytest.raises(ValueError, match=f"`id2label` {message}"):
        tiny_c2i_pipeline(id2label=id2label)


# ------------------------------------------------------------------------------------------------------- save and load


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


# --------------------------------------------------------------------------------------------------------- class names


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
