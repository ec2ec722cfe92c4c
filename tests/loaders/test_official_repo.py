"""Local paths and Hub repo ids (loaders/official_repo.py): a local path that does not exist is named offline, a cached
Hub repo named like a local folder still loads."""

import os
import re

import pytest
import torch

from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel

from ..helpers import sample, tiny_c2i_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


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
