"""The converter CLI (`pixnerd-convert`, convert.py): a loadable model or pipeline folder with one copy of the weights,
`--no-ema`, `python -m diffusers_pixnerd.convert`, an existing file as output refused."""

import os
import runpy
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.convert import main

from ..helpers import C2I_CKPT, T2I_CKPT, TOLERANCE, official_state_dict, relative_error, sample

pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_cli_writes_a_loadable_folder_with_one_copy_of_the_weights(tmp_path):
    out = tmp_path / "converted"
    main(["--checkpoint", C2I_CKPT, "--output", str(out)])
    files = sorted(os.listdir(out))
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    model = PixNerdTransformer2DModel.from_pretrained(out)
    weights = load_file(out / "diffusion_pytorch_model.safetensors")
    assert sum(t.numel() for t in weights.values()) == sum(p.numel() for p in model.parameters())
    # EMA weights by default: the class table equals the official `ema_denoiser.` one.
    torch.testing.assert_close(
        weights["class_embedder.weight"], official_state_dict()["ema_denoiser.y_embedder.embedding_table.weight"]
    )


def test_cli_no_ema_takes_online_weights(tmp_path):
    main(["--checkpoint", C2I_CKPT, "--output", str(tmp_path), "--no-ema", "--sample_size", "512"])
    model = PixNerdTransformer2DModel.from_pretrained(tmp_path)
    assert model.config.sample_size == 512
    torch.testing.assert_close(
        model.class_embedder.weight, official_state_dict()["denoiser.y_embedder.embedding_table.weight"]
    )


def test_cli_runs_as_module(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusers_pixnerd.convert",
            "--checkpoint",
            T2I_CKPT,
            "--output",
            str(tmp_path),
            "--dtype",
            "bfloat16",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "Wrote" in result.stdout
    assert {t.dtype for t in load_file(tmp_path / "diffusion_pytorch_model.safetensors").values()} == {torch.bfloat16}
    assert PixNerdTransformer2DModel.from_pretrained(tmp_path).is_text_conditional


def test_cli_refuses_an_output_that_is_an_existing_file(tmp_path, capsys):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"keep me")
    with pytest.raises(SystemExit, match="`--output` .*model.safetensors' is an existing file") as exited:
        main(["--checkpoint", C2I_CKPT, "--output", str(target)])
    assert exited.value.code != 0 and target.read_bytes() == b"keep me"
    assert "Wrote" not in capsys.readouterr().out
