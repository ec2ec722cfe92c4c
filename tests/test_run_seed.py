"""The one seed of a training run (`resolve_seed`): `--seed`, else the resumed checkpoint's, else drawn once."""

import json
import os
from types import SimpleNamespace

from diffusers_pixnerd.training import resolve_seed

ONE_PROCESS = SimpleNamespace(num_processes=1)  # the part of the `Accelerator` that `resolve_seed` reads


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
