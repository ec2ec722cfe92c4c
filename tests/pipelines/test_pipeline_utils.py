"""What both pipelines share (pipelines/pipeline_utils.py, `PixNerdBasePipeline`): other sigmas give other images,
a folder of the other kind is refused."""

import pytest

from ..helpers import sample, tiny_c2i_pipeline, tiny_t2i_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def test_a_folder_loaded_with_the_other_pipeline_class_is_an_error(tmp_path):
    from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline

    tiny_c2i_pipeline().save_pretrained(tmp_path / "c2i")
    tiny_t2i_pipeline().save_pretrained(tmp_path / "t2i")
    with pytest.raises(ValueError, match="class-conditional PixNerd model; use `PixNerdPipeline`"):
        PixNerdT2IPipeline.from_pretrained(tmp_path / "c2i")
    with pytest.raises(ValueError, match="text-to-image PixNerd model; use `PixNerdT2IPipeline`"):
        PixNerdPipeline.from_pretrained(tmp_path / "t2i")


def test_other_sigmas_give_another_image():
    pipe = tiny_c2i_pipeline()
    expected = sample(pipe, [1, 2], num_inference_steps=3)
    other = sample(pipe, [1, 2], sigmas=[1.0, 0.5, 0.1])
    assert pipe.num_timesteps == 3 and (other - expected).abs().max() > 1e-3
    t2i = tiny_t2i_pipeline(with_text_encoder=True)
    assert (sample(t2i, "a fox", sigmas=[1.0, 0.9]) - sample(t2i, "a fox")).abs().max() > 1e-3
