"""The input checks of both pipelines (pipelines/input_checks.py): guidance intervals, custom sigmas and `latents`
that disagree with the size, each named in a ValueError."""

import pytest
import torch

from ..helpers import sample, tiny_c2i_pipeline, tiny_t2i_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("interval", [0.5, "01", "ab", (None, 1.0), (0.1, 0.5, 1.0), [0.1, float("nan")]], ids=repr)
def test_guidance_interval_that_is_not_a_pair_of_numbers_is_named(interval):
    with pytest.raises(ValueError, match=r"`guidance_interval` must be a pair of numbers \(min, max\)"):
        sample(tiny_c2i_pipeline(), [1], guidance_interval=interval)
    with pytest.raises(ValueError, match=r"`guidance_interval` must be a pair of numbers"):
        sample(tiny_t2i_pipeline(), prompt_embeds=torch.zeros(1, 6, 24), guidance_interval=interval, guidance_scale=1)


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


@pytest.mark.parametrize("size", [dict(height=16), dict(width=16), dict(height=16, width=16)])
def test_height_or_width_that_disagree_with_the_latents_are_an_error(size):
    latents = torch.randn(1, 3, 24, 24)
    with pytest.raises(ValueError, match=r"`latents` must have shape \(1, 3, \d+, \d+\), got \(1, 3, 24, 24\)"):
        sample(tiny_c2i_pipeline(), [1], latents=latents, **size)
    with pytest.raises(ValueError, match=r"`latents` must have shape"):
        sample(tiny_t2i_pipeline(with_text_encoder=True), "a fox", latents=latents, **size)
