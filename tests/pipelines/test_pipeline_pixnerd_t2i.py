"""PixNerdT2IPipeline (pipelines/pipeline_pixnerd_t2i.py), the text-to-image pipeline: official parity of sampling
and of the Qwen3 prompt encoding, sampling, `encode_prompt` without a transformer, custom sigmas, prompt embeddings in
callbacks, the size from `latents`, bad input, saving."""

import math
import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdT2IPipeline
from diffusers_pixnerd.pipelines.pipeline_pixnerd_t2i import DEFAULT_MAX_SEQUENCE_LENGTH
from diffusers_pixnerd.testing_utils import qwen3_tokenizer

from ..helpers import (
    BATCH_TOLERANCE,
    T2I_CKPT,
    TOLERANCE,
    count_transformer_calls,
    official_samples,
    own_sigmas,
    relative_error,
    sample,
    tiny_t2i_pipeline,
)

pytestmark = pytest.mark.usefixtures("single_thread")


QWEN3_HIDDEN_SIZE = 32  # of the tiny Qwen3 of the fixtures (official_samples()[1]["qwen3_config"])


# --------------------------------------------------------------------------------------- parity with the official code


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


# ------------------------------------------------------------------------------------------------------------ sampling


def test_t2i_batched_and_one_by_one_sampling_agree():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    prompts = ["a red fox", "a cat on a mat"]
    batched = sample(pipe, prompts, generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    for i, prompt in enumerate(prompts):
        single = sample(pipe, prompt, generator=torch.Generator().manual_seed(i + 1))
        assert relative_error(batched[i : i + 1], single) < BATCH_TOLERANCE


def test_t2i_num_images_per_prompt_repeats_each_prompt():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    images = sample(pipe, ["a red fox", "a cat"], num_images_per_prompt=3)
    assert images.shape == (6, 3, 16, 16)
    assert (images[0] - images[1]).abs().max() > 1e-2
    reference = sample(pipe, ["a red fox"] * 3 + ["a cat"] * 3)
    torch.testing.assert_close(images, reference)


def test_t2i_guidance_skipped_outside_interval(monkeypatch):
    pipe = tiny_t2i_pipeline(with_text_encoder=True, shift=1.0)
    batch_sizes = count_transformer_calls(pipe, monkeypatch)
    pipe("a red fox", num_inference_steps=4, guidance_interval=(0.3, 0.6), output_type="latent")
    assert batch_sizes == [1, 1, 2, 1]


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


# --------------------------------------------------------------------------------- encode_prompt without a transformer


def encoder_only(pipe: PixNerdT2IPipeline) -> PixNerdT2IPipeline:
    """The text encoder and tokenizer of `pipe` in a pipeline without a transformer."""
    return PixNerdT2IPipeline(
        transformer=None, scheduler=pipe.scheduler, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )


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


# -------------------------------------------------------------------------------------------------------------- sigmas


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


# ------------------------------------------------------------------------------------ callbacks and the sampling state


def test_t2i_callback_sees_current_timestep():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((pipeline.current_timestep, timestep))
        return callback_kwargs

    sample(pipe, "a red fox", num_inference_steps=2, guidance_scale=1.0, callback_on_step_end=callback)
    assert [float(t) for t, _ in seen] == [float(t) for _, t in seen] == pipe.scheduler.timesteps.tolist()
    assert pipe.current_timestep is None and not pipe.do_classifier_free_guidance


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


def spy_encoder_hidden_states(pipe) -> list[torch.Tensor]:
    """The `encoder_hidden_states` of every transformer call, recorded while the pipeline runs."""
    recorded, forward = [], pipe.transformer.forward

    def spy(*args, **kwargs):
        recorded.append(kwargs["encoder_hidden_states"].clone())
        return forward(*args, **kwargs)

    pipe.transformer.forward = spy
    return recorded


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


# ---------------------------------------------------------------------------------------------------------- image size


def test_t2i_latents_set_the_image_size():
    pipe = tiny_t2i_pipeline(with_text_encoder=True)
    assert 24 % pipe.transformer.resolution_multiple == 0 and pipe.transformer.config.sample_size != 24
    latents = torch.randn(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    images = sample(pipe, "a red fox", latents=latents)
    assert images.shape == (1, 3, 24, 24)
    assert torch.equal(images, sample(pipe, "a red fox", latents=latents, height=24, width=24))


# ----------------------------------------------------------------------------------------------------------- bad input


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


@pytest.mark.parametrize("name", ["prompt_embeds", "negative_prompt_embeds"])
def test_prompt_embeds_with_nan_or_inf_are_an_error(name):
    pipe = tiny_t2i_pipeline()
    embeds = {
        "prompt_embeds": torch.zeros(1, 6, 24),
        "negative_prompt_embeds": torch.zeros(1, 6, 24),
    }
    embeds[name][0, 0, 0] = math.inf
    with pytest.raises(ValueError, match=f"`{name}` contain NaN or infinite values"):
        sample(pipe, **embeds)


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


# ------------------------------------------------------------------------------------------------------- save and load


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
