"""The model card and loader file a saved pipeline carries (pipelines/model_card.py): a README it did not write is
kept, the card loads the folder by its name, and diffusers loads the folder through the saved `pipeline_pixnerd.py`
without importing the package."""

import os
import subprocess
import sys

import pytest
import torch

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.testing_utils import TINY_C2I

from ..helpers import LABELS, TOLERANCE, relative_error, sample, tiny_c2i_pipeline, tiny_t2i_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_a_saved_pipeline_card_loads_its_folder_by_name(tmp_path, monkeypatch):
    torch.manual_seed(0)
    pipe = PixNerdPipeline(transformer=PixNerdTransformer2DModel(**TINY_C2I), scheduler=PixNerdFlowMatchScheduler())
    pipe.save_pretrained(tmp_path / "exports" / "my-model")
    card = (tmp_path / "exports" / "my-model" / "README.md").read_text()
    assert 'pipe = PixNerdPipeline.from_pretrained("my-model")' in card and str(tmp_path) not in card
    monkeypatch.chdir(tmp_path)
    pipe.save_pretrained("exports/again")
    card = (tmp_path / "exports" / "again" / "README.md").read_text()
    assert 'pipe = PixNerdPipeline.from_pretrained("exports/again")' in card
