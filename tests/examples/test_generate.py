"""examples/generate.py, the demo: labelled grids of the bundled models, text-to-image with and without a LoRA, the
turbo LoRA beside the default sampler with their times."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_pixnerd import load_pipeline

from ..helpers import BUNDLED_LORA, BUNDLED_T2I, BUNDLED_TURBO, ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
import generate  # noqa: E402


def test_demo_writes_a_labelled_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    generate.main(generate.parse_args(["--output", str(out), "--num_inference_steps", "10"]))
    assert f"Wrote {out}" in capsys.readouterr().out
    grid = np.asarray(Image.open(out).convert("L"), dtype=np.float32)
    # 10 classes x 4 images, cells of 96 px with a caption strip below each.
    assert grid.shape[1] == 10 * 96 and grid.shape[0] > 4 * 96
    cells = [grid[:96, c * 96 : (c + 1) * 96] for c in range(10)]
    assert all(cell.std() > 10 for cell in cells)  # garments on a dark background, not blank cells
    assert not np.allclose(cells[1], cells[8])  # a trouser is not a bag


def test_demo_rejects_a_prompt_for_a_class_model(tmp_path):
    with pytest.raises(ValueError, match="--class_labels"):
        generate.main(generate.parse_args(["--prompt", "a shoe", "--output", str(tmp_path / "x.png")]))


def test_demo_puts_the_turbo_grid_beside_the_default_one_with_their_times(tmp_path):
    out = tmp_path / "turbo.png"
    args = ["--model", BUNDLED_T2I, "--lora", BUNDLED_TURBO, "--beside_default", "--num_images_per_label", "1"]
    generate.main(generate.parse_args([*args, "--output", str(out)]))
    grid = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
    width = len(generate.BUNDLED_T2I_PROMPTS) * 96
    assert grid.shape[1] == 2 * width + 24  # two grids and the gap
    for left in (0, width + 24):  # under each header, every cell holds a garment
        cells = grid[34 : 34 + 96, left : left + width].reshape(96, -1, 96, 3)
        assert all(cells[:, i].std() > 10 for i in range(cells.shape[1]))
    assert grid[:34].min() < 128  # the headers' text
    base, turbo = load_pipeline(BUNDLED_T2I), load_pipeline(BUNDLED_T2I, lora=BUNDLED_TURBO)
    assert generate.sampler_title(base, {}, 9.87, 20) == "50 steps, CFG 5, Adams-2: 9.9 s for 20 images"
    assert generate.sampler_title(turbo, {}, 0.42, 20) == "4 steps, no CFG, Euler: 0.4 s for 20 images"
    assert (
        generate.sampler_title(turbo, {"num_inference_steps": 2}, 0.2, 5)
        == "2 steps, no CFG, Euler: 0.2 s for 5 images"
    )
    with pytest.raises(ValueError, match="`--beside_default` compares a LoRA's grid"):
        generate.main(generate.parse_args(["--model", BUNDLED_T2I, "--beside_default", "--output", str(out)]))


def test_demo_writes_text_to_image_grids_with_and_without_the_lora(tmp_path, capsys):
    for extra in ([], ["--lora", BUNDLED_LORA]):
        out = tmp_path / f"t2i{len(extra)}.png"
        args = ["--model", BUNDLED_T2I, *extra, "--num_inference_steps", "10", "--num_images_per_label", "1"]
        generate.main(generate.parse_args([*args, "--output", str(out)]))
        grid = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)
        prompts = generate.BUNDLED_LORA_PROMPTS if extra else generate.BUNDLED_T2I_PROMPTS
        assert grid.shape[1] == len(prompts) * 96
        cells = grid[:96].reshape(96, len(prompts), 96, 3)
        assert all(cells[:, i].std() > 10 for i in range(len(prompts)))
        redness = cells[..., 0].mean() - cells[..., 1:].mean()
        assert (redness > 10) if extra else (abs(redness) < 2), redness
