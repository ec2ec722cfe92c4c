"""Bad input gets a clear error naming the argument (issue: no silent wrong result): the scheduler, the model config,
the pipelines' numbers and tensors. Each case asserts the exception type and the argument named in the message."""

import math

import numpy as np
import pytest
import torch
from conftest import TINY_C2I
from test_pipelines import sample, tiny_c2i_pipeline, tiny_t2i_pipeline

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdTransformer2DModel

# ------------------------------------------------------------------------------------------------------ scheduler


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"shift": float("nan")}, "shift"),
        ({"shift": float("inf")}, "shift"),
        ({"shift": 0.0}, "shift"),
        ({"shift": "3"}, "shift"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": 1000.5}, "num_train_timesteps"),
        ({"solver_order": 2.0}, "solver_order"),
        ({"solver_order": 5}, "solver_order"),
        ({"solver_order": True}, "solver_order"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"guidance_interval_min": float("nan")}, r"\(guidance_interval_min"),
    ],
)
def test_scheduler_config_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        PixNerdFlowMatchScheduler(**kwargs)


def test_scheduler_takes_numpy_numbers():
    scheduler = PixNerdFlowMatchScheduler(solver_order=np.int64(1), shift=np.float32(2.0))
    scheduler.set_timesteps(np.int64(4))
    assert len(scheduler.timesteps) == 4


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_custom_sigmas_are_an_error(bad):
    scheduler = PixNerdFlowMatchScheduler()
    with pytest.raises(ValueError, match="`sigmas` must be a non-empty, strictly decreasing 1-D sequence of finite"):
        scheduler.set_timesteps(sigmas=[1.0, bad, 0.25])


def test_step_with_a_model_output_of_another_shape_is_an_error():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(4)
    sample_ = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`model_output` has shape \(1, 3, 8, 4\) but `sample` \(1, 3, 8, 8\)"):
        scheduler.step(torch.zeros(1, 3, 8, 4), scheduler.timesteps[0], sample_)


# ---------------------------------------------------------------------------------------------------- model config


@pytest.mark.parametrize(
    "argument, value",
    [
        ("sample_size", 0),
        ("patch_size", 0),
        ("patch_size", 2.5),
        ("num_layers", -1),
        ("num_attention_heads", 0),
        ("attention_head_dim", "16"),
        ("num_neural_field_layers", 0),
        ("neural_field_hidden_size", 0),
        ("num_classes", 0),
        ("in_channels", 0),
        ("mlp_ratio", float("nan")),
        ("mlp_ratio", 0),
    ],
)
def test_model_config_errors_name_the_argument(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}` must be a positive"):
        PixNerdTransformer2DModel(**{**TINY_C2I, argument: value})


# ------------------------------------------------------------------------------------------------------- pipelines


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


@pytest.mark.parametrize("height", [16.0, "16", 16.5])
def test_a_height_that_is_not_an_integer_is_named(height):
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match="`height` and `width` must be integers"):
        sample(pipe, class_labels=[1], height=height)


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


# ------------------------------------------------------------------------------------------------- no lost files


def test_save_pretrained_never_overwrites_a_readme_it_did_not_write(tmp_path, caplog):
    import logging

    pipe = tiny_c2i_pipeline()
    (tmp_path / "README.md").write_text("# my notes\n")
    with caplog.at_level(logging.WARNING):
        pipe.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    assert "was not written by diffusers-pixnerd: kept as it is" in caplog.text
    assert (tmp_path / "model_index.json").exists()  # the pipeline itself is saved

    ours = tmp_path / "ours"
    pipe.save_pretrained(ours)
    pipe.save_pretrained(ours, model_card_extra="## Notes\n\nsecond save")  # our own card is rewritten
    assert "second save" in (ours / "README.md").read_text()


def test_a_folder_loaded_with_the_other_pipeline_class_is_an_error(tmp_path):
    from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline

    tiny_c2i_pipeline().save_pretrained(tmp_path / "c2i")
    tiny_t2i_pipeline().save_pretrained(tmp_path / "t2i")
    with pytest.raises(ValueError, match="class-conditional PixNerd model; use `PixNerdPipeline`"):
        PixNerdT2IPipeline.from_pretrained(tmp_path / "c2i")
    with pytest.raises(ValueError, match="text-to-image PixNerd model; use `PixNerdT2IPipeline`"):
        PixNerdPipeline.from_pretrained(tmp_path / "t2i")


@pytest.mark.parametrize(
    "id2label, message",
    [({"zero": "cat"}, "keys must be class ids"), ({"11": "cat"}, "keys must be class ids"), ({"0": 3}, "values")],
)
def test_bad_id2label_is_named(id2label, message):
    with pytest.raises(ValueError, match=f"`id2label` {message}"):
        tiny_c2i_pipeline(id2label=id2label)


def test_a_callback_that_returns_no_dict_is_named():
    pipe = tiny_c2i_pipeline()
    with pytest.raises(ValueError, match="`callback_on_step_end` must return a dict .*got NoneType"):
        sample(pipe, class_labels=[1], callback_on_step_end=lambda pipe, i, t, kwargs: None)
