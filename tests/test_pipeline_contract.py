"""The diffusers pipeline contract of PixNerdPipeline and PixNerdT2IPipeline, as diffusers' Sana, Lumina2 and DiT
pipelines keep it: `encode_prompt` without a transformer, custom `sigmas`, the sampling-state properties
(`current_timestep`, ...), prompt embeddings in callbacks, DiT's shapes of class labels, the size from `latents`."""

import numpy as np
import pytest
import torch
from conftest import qwen3_tokenizer
from diffusers import FlowMatchEulerDiscreteScheduler
from test_pipelines import LABELS, relative_error, sample, tiny_c2i_pipeline, tiny_t2i_pipeline

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdT2IPipeline
from diffusers_pixnerd.pipelines.pipeline_pixnerd_t2i import DEFAULT_MAX_SEQUENCE_LENGTH

QWEN3_HIDDEN_SIZE = 32  # of the tiny Qwen3 of the fixtures (official_samples()[1]["qwen3_config"])


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The tiny models run fastest on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def encoder_only(pipe: PixNerdT2IPipeline) -> PixNerdT2IPipeline:
    """The text encoder and tokenizer of `pipe` in a pipeline without a transformer."""
    return PixNerdT2IPipeline(
        transformer=None, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )


# ------------------------------------------------------------------------------- encode_prompt without a transformer


def test_encode_prompt_without_transformer_equals_the_full_pipeline():
    pipe = tiny_t2i_pipeline(with_text_encoder=True, text_embed_dim=QWEN3_HIDDEN_SIZE)
    text_max_length = pipe.transformer.config.text_max_length
    prompts = ["a red fox", "two dogs on a very long sofa in the late afternoon sun"]
    assert len(qwen3_tokenizer()(prompts[1]).input_ids) > text_max_length  # truncated, the other one padded
    expected, expected_negative = pipe.encode_prompt(prompts, negative_prompt="blurry", num_images_per_prompt=2)

    embeds, negative = encoder_only(pipe).encode_prompt(
        prompts, negative_prompt="blurry", num_images_per_prompt=2, max_sequence_length=text_max_length
    )
    assert embeds.shape == (4, text_max_length, QWEN3_HIDDEN_SIZE)
    assert torch.equal(embeds, expected) and torch.equal(negative, expected_negative)
    # They drive the full pipeline to the image of the prompt.
    from_embeds = sample(pipe, prompt_embeds=embeds[::2], negative_prompt_embeds=negative[::2])
    assert torch.equal(from_embeds, sample(pipe, prompts, negative_prompt="blurry"))


def test_encode_prompt_of_a_pipeline_loaded_without_transformer(tmp_path):
    pipe = tiny_t2i_pipeline(with_text_encoder=True, text_embed_dim=QWEN3_HIDDEN_SIZE)
    pipe.save_pretrained(tmp_path)
    loaded = PixNerdT2IPipeline.from_pretrained(tmp_path, transformer=None)
    assert loaded.transformer is None
    length = pipe.transformer.config.text_max_length
    expected = pipe.encode_prompt(["a red fox"], do_classifier_free_guidance=False)[0]
    embeds, negative = loaded.encode_prompt(
        ["a red fox"], do_classifier_free_guidance=False, max_sequence_length=length
    )
    assert negative is None and torch.equal(embeds, expected)


def test_encode_prompt_without_transformer_defaults_to_the_official_length_and_the_encoder_width():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    embeds, negative = encoder_only(pipe).encode_prompt("a red fox")
    assert DEFAULT_MAX_SEQUENCE_LENGTH == 128  # the official model's text_max_length
    assert embeds.shape == negative.shape == (1, DEFAULT_MAX_SEQUENCE_LENGTH, QWEN3_HIDDEN_SIZE)
    # The same padding and truncation as with a transformer: the first tokens agree, whatever the length.
    short, _ = encoder_only(pipe).encode_prompt("a red fox", max_sequence_length=6)
    torch.testing.assert_close(embeds[:, :6], short)


def test_encode_prompt_with_a_wider_transformer_zero_pads_the_encoder_output():
    pipe = tiny_t2i_pipeline(with_text_encoder=True, text_embed_dim=40)
    padded, _ = pipe.encode_prompt(["a red fox"], do_classifier_free_guidance=False)
    plain, _ = encoder_only(pipe).encode_prompt(
        ["a red fox"], do_classifier_free_guidance=False, max_sequence_length=6
    )
    assert torch.equal(padded[..., :QWEN3_HIDDEN_SIZE], plain) and padded[..., QWEN3_HIDDEN_SIZE:].abs().max() == 0


def test_encode_prompt_without_transformer_has_the_text_encoder_dtype():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    pipe.text_encoder.to(torch.bfloat16)
    embeds, negative = encoder_only(pipe).encode_prompt("a red fox")
    assert embeds.dtype == negative.dtype == torch.bfloat16
    assert pipe.encode_prompt("a red fox")[0].dtype == torch.float32  # the transformer's, when there is one


def test_encode_prompt_without_encoder_or_prompt_is_a_clear_error():
    pipe = PixNerdT2IPipeline(transformer=None, scheduler=PixNerdFlowMatchScheduler())
    with pytest.raises(ValueError, match=r"no `text_encoder`/`tokenizer`"):
        pipe.encode_prompt("a red fox")
    with pytest.raises(ValueError, match=r"`prompt` or `prompt_embeds`"):
        pipe.encode_prompt(None)
    encoder = encoder_only(tiny_t2i_pipeline(with_text_encoder=True))
    with pytest.raises(ValueError, match=r"`max_sequence_length` must be a positive integer"):
        encoder.encode_prompt("a red fox", max_sequence_length=0)


def test_generating_without_transformer_is_a_clear_error():
    pipe = encoder_only(tiny_t2i_pipeline(with_text_encoder=True))
    with pytest.raises(ValueError, match=r"no `transformer`"):
        pipe("a red fox")


def test_max_sequence_length_other_than_the_transformers_is_an_error_in_call():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    with pytest.raises(ValueError, match=r"`max_sequence_length` must be 6"):
        pipe("a red fox", max_sequence_length=DEFAULT_MAX_SEQUENCE_LENGTH)
    assert torch.equal(sample(pipe, "a red fox", max_sequence_length=6), sample(pipe, "a red fox"))


# ----------------------------------------------------------------------------------------------------------- sigmas


def own_sigmas(pipe, num_inference_steps: int) -> torch.Tensor:
    """The sigmas of the scheduler's own grid (unshifted: the tiny pipelines use shift 1), without the final 0."""
    assert pipe.scheduler.config.shift == 1.0
    pipe.scheduler.set_timesteps(num_inference_steps)
    return pipe.scheduler.sigmas[:-1].clone()


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


def test_t2i_sigmas_of_the_scheduler_grid_give_the_default_image():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    expected = sample(pipe, "a red fox", num_inference_steps=3)
    assert torch.equal(sample(pipe, "a red fox", sigmas=own_sigmas(pipe, 3)), expected)


def test_t2i_linspace_sigmas_give_the_default_image_of_a_shifted_scheduler():
    pipe = tiny_t2i_pipeline(with_text_encoder=True, shift=3.0)
    expected = sample(pipe, "a red fox", num_inference_steps=4)
    # The documented default grid; shifted by the scheduler (the official formula rounds differently in float32).
    got = sample(pipe, "a red fox", sigmas=np.linspace(1.0, 1 / 4, 4))
    assert relative_error(got, expected) < 1e-5


def test_other_sigmas_give_another_image():
    pipe = tiny_c2i_pipeline()
    expected = sample(pipe, [1, 2], num_inference_steps=3)
    other = sample(pipe, [1, 2], sigmas=[1.0, 0.5, 0.1])
    assert pipe.num_timesteps == 3 and (other - expected).abs().max() > 1e-3
    t2i = tiny_t2i_pipeline(with_text_encoder=True)
    assert (sample(t2i, "a fox", sigmas=[1.0, 0.9]) - sample(t2i, "a fox")).abs().max() > 1e-3


def test_sigmas_with_flow_match_euler_discrete_scheduler():
    reference = FlowMatchEulerDiscreteScheduler()
    reference.set_timesteps(3)
    pipe = tiny_c2i_pipeline()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    expected = sample(pipe, [1, 2], num_inference_steps=3)
    assert torch.equal(sample(pipe, [1, 2], sigmas=reference.sigmas[:-1]), expected)
    assert (sample(pipe, [1, 2], sigmas=[1.0, 0.6, 0.2]) - expected).abs().max() > 1e-3


@pytest.mark.parametrize(
    "sigmas",
    [
        [0.5, 0.8],  # increasing
        [1.0, 1.0, 0.5],  # not strictly decreasing
        [1.0, 0.5, 0.0],  # with the final 0
        [1.5, 0.5],  # above 1
        [1.0, -0.5],
        [1.0, float("nan")],
        [],
        [[1.0, 0.5]],  # 2-D
        torch.tensor(0.5),  # 0-D
        "1.0, 0.5",
        [1.0, "a"],
    ],
)
@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_bad_sigmas_are_a_value_error_naming_them(sigmas, variant):
    if variant == "c2i":
        pipe, condition = tiny_c2i_pipeline(), dict(class_labels=[1])
    else:
        pipe, condition = tiny_t2i_pipeline(with_text_encoder=True), dict(prompt="a fox")
    with pytest.raises(ValueError, match=r"`sigmas` must be a non-empty, strictly decreasing 1-D sequence"):
        sample(pipe, **condition, sigmas=sigmas)


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


# ------------------------------------------------------------------------------------------- sampling-state properties


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


def test_t2i_callback_sees_current_timestep():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((pipeline.current_timestep, timestep))
        return callback_kwargs

    sample(pipe, "a red fox", num_inference_steps=2, guidance_scale=1.0, callback_on_step_end=callback)
    assert [float(t) for t, _ in seen] == [float(t) for _, t in seen] == pipe.scheduler.timesteps.tolist()
    assert pipe.current_timestep is None and not pipe.do_classifier_free_guidance


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


# ------------------------------------------------------------------------------------- prompt embeddings in callbacks


def spy_encoder_hidden_states(pipe) -> list[torch.Tensor]:
    """The `encoder_hidden_states` of every transformer call, recorded while the pipeline runs."""
    recorded, forward = [], pipe.transformer.forward

    def spy(*args, **kwargs):
        recorded.append(kwargs["encoder_hidden_states"].clone())
        return forward(*args, **kwargs)

    pipe.transformer.forward = spy
    return recorded


def test_t2i_callback_tensor_inputs_include_the_prompt_embeddings():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    assert pipe._callback_tensor_inputs == ["latents", "prompt_embeds", "negative_prompt_embeds"]
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(["a red fox", "a cat"], negative_prompt="blurry")
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append(dict(callback_kwargs))  # a copy: the pipeline pops what the callback returns
        return callback_kwargs  # the common pass-through: nothing changes

    images = sample(
        pipe,
        ["a red fox", "a cat"],
        negative_prompt="blurry",
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"],
    )
    assert len(seen) == 2 and all(
        set(kwargs) == {"latents", "prompt_embeds", "negative_prompt_embeds"} for kwargs in seen
    )
    for kwargs in seen:
        assert torch.equal(kwargs["prompt_embeds"], prompt_embeds)
        assert torch.equal(kwargs["negative_prompt_embeds"], negative_prompt_embeds)
    assert torch.equal(seen[-1]["latents"], images)
    assert torch.equal(images, sample(pipe, ["a red fox", "a cat"], negative_prompt="blurry"))


def test_t2i_negative_prompt_embeds_are_none_in_callbacks_without_guidance():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append(callback_kwargs["negative_prompt_embeds"])
        return {}

    sample(
        pipe,
        "a red fox",
        guidance_scale=1.0,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["negative_prompt_embeds"],
    )
    assert seen == [None, None]


@pytest.mark.parametrize("name", ["prompt_embeds", "negative_prompt_embeds"])
def test_t2i_callback_replacing_prompt_embeddings_conditions_the_next_steps(name):
    pipe = tiny_t2i_pipeline(with_text_encoder=True)  # 2 steps: t = 0 unguided, t = 0.5 guided
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(["a red fox"], negative_prompt="blurry")
    replacement = pipe.encode_prompt(["a cat on a mat"], do_classifier_free_guidance=False)[0]
    expected = sample(pipe, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds)
    recorded = spy_encoder_hidden_states(pipe)

    original = prompt_embeds if name == "prompt_embeds" else negative_prompt_embeds

    def replace(pipeline, step, timestep, callback_kwargs):
        assert torch.equal(callback_kwargs[name], original if step == 0 else replacement)
        return {name: replacement} if step == 0 else {}

    images = sample(
        pipe,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        callback_on_step_end=replace,
        callback_on_step_end_tensor_inputs=[name],
    )
    assert len(recorded) == 2
    assert torch.equal(recorded[0], prompt_embeds)  # step 0, unguided: the original condition
    if name == "prompt_embeds":  # step 1, guided: [uncond, cond] with the replacement
        assert torch.equal(recorded[1], torch.cat([negative_prompt_embeds, replacement]))
    else:
        assert torch.equal(recorded[1], torch.cat([replacement, prompt_embeds]))
    assert (images - expected).abs().max() > 1e-3


def test_t2i_callback_returning_prompt_embeds_of_another_shape_is_an_error():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)

    def bad(pipeline, step, timestep, callback_kwargs):
        return {"prompt_embeds": torch.zeros(2, 6, 24)}

    with pytest.raises(ValueError, match=r"`prompt_embeds` of shape \(2, 6, 24\); expected \(1, 6, 24\)"):
        sample(pipe, "a red fox", callback_on_step_end=bad, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_c2i_callback_tensor_inputs_are_the_latents_only():
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match=r"`callback_on_step_end_tensor_inputs` must be in \['latents'\]"):
        sample(pipe, [1], callback_on_step_end=lambda *args: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"])


# ----------------------------------------------------------------------------------------------------- class labels


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


# ------------------------------------------------------------------------------------------------ size from latents


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


def test_t2i_latents_set_the_image_size():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    assert 24 % pipe.transformer.resolution_multiple == 0 and pipe.transformer.config.sample_size != 24
    latents = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    images = sample(pipe, "a red fox", latents=latents)
    assert images.shape == (1, 3, 24, 24)
    assert torch.equal(images, sample(pipe, "a red fox", latents=latents, height=24, width=24))


@pytest.mark.parametrize("size", [dict(height=16), dict(width=16), dict(height=16, width=16)])
def test_height_or_width_that_disagree_with_the_latents_are_an_error(size):
    latents = torch.randn(1, 3, 24, 24)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 3, \d+, \d+\), got \(1, 3, 24, 24\)"):
        sample(tiny_c2i_pipeline(), [1], latents=latents, **size)
    with pytest.raises(ValueError, match=r"`latents` must have shape"):
        sample(tiny_t2i_pipeline(with_text_encoder=True), "a fox", latents=latents, **size)


def test_latents_of_a_size_the_model_cannot_take_are_an_error():
    latents = torch.randn(1, 3, 18, 24)
    with pytest.raises(ValueError, match=r"`height` and `width` must be positive multiples of 4, got \(18, 24\)"):
        sample(tiny_c2i_pipeline(), [1], latents=latents)
