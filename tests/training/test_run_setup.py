"""training/run_setup.py: the one seed of a training run (`resolve_seed`: `--seed`, else the resumed checkpoint's, else
drawn once) and the quantized text encoder (`--quantize_text_encoder`)."""

import json
import os
from types import SimpleNamespace

import pytest
import torch

from diffusers_pixnerd import PixNerdT2IPipeline
from diffusers_pixnerd.testing_utils import qwen3_tokenizer, tiny_qwen3
from diffusers_pixnerd.training import quantize_text_encoder, resolve_seed

from ..helpers import T2I_SCRIPT, t2i_args

ONE_PROCESS = SimpleNamespace(num_processes=1)  # the part of the `Accelerator` that `resolve_seed` reads


# ------------------------------------------------------------------------------------------------------ the run's seed


def checkpoint_with_seed(tmp_path, seed: int) -> str:
    """A checkpoint folder whose `training_state.json` (as `TrainingRun.save` writes it) records `seed`."""
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    state = {
        "global_step": 2,
        "seed": seed,
        "num_processes": 1,
        "train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_epoch": 4,
    }
    (folder / "training_state.json").write_text(json.dumps(state))
    return str(folder)


def test_a_resumed_run_without_seed_keeps_the_seed_of_its_checkpoint(tmp_path):
    assert resolve_seed(ONE_PROCESS, None, checkpoint_with_seed(tmp_path, 1234)) == 1234


def test_a_given_seed_wins_over_the_checkpoint(tmp_path):
    checkpoint = checkpoint_with_seed(tmp_path, 1234)
    assert resolve_seed(ONE_PROCESS, 7, checkpoint) == 7
    assert resolve_seed(ONE_PROCESS, 0, checkpoint) == 0  # 0 is a seed, not "unset"


def test_a_new_run_without_seed_draws_one(monkeypatch):
    monkeypatch.setattr(os, "urandom", lambda n: (4321).to_bytes(n, "little"))
    assert resolve_seed(ONE_PROCESS, None, None) == 4321


# ------------------------------------------------------------------------------------------ the quantized text encoder


def test_the_quantized_text_encoder_is_int8_close_and_leaves_the_original():
    pytest.importorskip("torchao", reason="torchao is installed by `make test` (the quantization extra)")
    encoder, tokenizer = tiny_qwen3(), qwen3_tokenizer()
    original = {k: v.clone() for k, v in encoder.state_dict().items()}
    ids = tokenizer(["a red fox in the snow", "a cat"], return_tensors="pt", padding=True)
    quantized = quantize_text_encoder(encoder, torch.float32)
    with torch.no_grad():
        reference, approx = encoder(**ids).last_hidden_state, quantized(**ids).last_hidden_state
    assert "Int8" in type(quantized.layers[0].mlp.up_proj.weight).__name__
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in original.items())
    error = (approx - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.05, error


def test_t2i_training_with_the_quantized_encoder_exports_the_original(assets, tmp_path, run_main):
    pytest.importorskip("torchao", reason="torchao is installed by `make test` (the quantization extra)")
    out = tmp_path / "q"
    args = t2i_args(assets, "captions_jsonl", out, "--max_train_steps", 2, "--no_use_repa", "--quantize_text_encoder")
    run_main(T2I_SCRIPT, args)
    base = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline").text_encoder.state_dict()
    exported = PixNerdT2IPipeline.from_pretrained(out).text_encoder.state_dict()
    assert base.keys() == exported.keys() and all(torch.equal(base[k], exported[k]) for k in base)
