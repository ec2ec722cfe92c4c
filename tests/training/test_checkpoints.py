"""training/checkpoints.py: checkpoints committed atomically and pruned, `latest`, an earlier run in the output folder,
a full disk told from another write error, the weights evaluated from a checkpoint, the printed resume command."""

import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from diffusers_pixnerd.testing_utils import randomize_
from diffusers_pixnerd.training import (
    check_output_dir,
    commit_checkpoint,
    list_checkpoints,
    remove_temporary_checkpoints,
    resolve_checkpoint,
)
from diffusers_pixnerd.training.checkpoints import resume_command

from ..helpers import ROOT, free_port, tiny_c2i

pytestmark = pytest.mark.usefixtures("single_thread")


CHILD = """import os
from diffusers_pixnerd.training.checkpoints import resume_command
if os.environ.get("RANK", "0") == "0":
    print("RESUME:", resume_command())
"""


# --------------------------------------------------------------------------------------------------------- checkpoints


def make_checkpoint(output_dir, name):
    """A complete checkpoint folder: its state file is there (written last by a real save)."""
    os.makedirs(os.path.join(output_dir, name))
    with open(os.path.join(output_dir, name, "model.safetensors"), "w") as f:
        f.write(name)
    with open(os.path.join(output_dir, name, "training_state.json"), "w") as f:
        f.write("{}")


def test_latest_ignores_a_checkpoint_whose_save_was_killed(tmp_path):
    make_checkpoint(tmp_path, "checkpoint-10")
    make_checkpoint(tmp_path, "checkpoint-2")
    make_checkpoint(tmp_path, "checkpoint-20.tmp")  # killed mid-save: never renamed
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 10]
    assert resolve_checkpoint(str(tmp_path), "latest") == os.path.join(tmp_path, "checkpoint-10")
    remove_temporary_checkpoints(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2"]


def test_commit_renames_then_prunes_to_the_total_limit(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, f"checkpoint-{step}")
    make_checkpoint(tmp_path, "checkpoint-4.tmp")
    final = commit_checkpoint(os.path.join(tmp_path, "checkpoint-4.tmp"), total_limit=2)
    assert final == os.path.join(tmp_path, "checkpoint-4")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]


def test_commit_replaces_a_checkpoint_of_the_same_step(tmp_path):
    make_checkpoint(tmp_path, "checkpoint-4")
    os.makedirs(tmp_path / "checkpoint-4.tmp")
    (tmp_path / "checkpoint-4.tmp" / "new").write_text("x")
    commit_checkpoint(str(tmp_path / "checkpoint-4.tmp"))
    assert os.listdir(tmp_path / "checkpoint-4") == ["new"]


def test_a_folder_without_its_state_file_is_not_a_checkpoint(tmp_path):
    from diffusers_pixnerd.training import list_checkpoints

    os.makedirs(tmp_path / "checkpoint-5")  # a half-copied folder
    os.makedirs(tmp_path / "checkpoint-3")
    (tmp_path / "checkpoint-3" / "training_state.json").write_text("{}")
    assert list_checkpoints(tmp_path) == [(3, str(tmp_path / "checkpoint-3"))]


def test_resume_from_missing_checkpoint_name_is_an_error(tmp_path):
    assert resolve_checkpoint(str(tmp_path), "latest") is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_checkpoint(str(tmp_path), "checkpoint-7")


def test_an_earlier_run_needs_resume_or_overwrite(tmp_path):
    check_output_dir(str(tmp_path), None, False)  # empty: fine
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        check_output_dir(str(tmp_path), None, False)
    check_output_dir(str(tmp_path), None, True)
    check_output_dir(str(tmp_path), "latest", False)


def test_a_write_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path, monkeypatch):
    from diffusers_pixnerd.training import checkpoints

    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "training_state.json").write_text("{}")
    (tmp_path / "checkpoint-2" / "model.safetensors").write_bytes(b"x" * 4096)
    monkeypatch.setattr(checkpoints, "free_space", lambda folder: 2**30)
    writer = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024")
    temporary = str(tmp_path / "checkpoint-4.tmp")
    assert checkpoints.disk_full_error(writer, temporary, str(tmp_path)) is None
    assert checkpoints.disk_full_error(PermissionError(13, "Permission denied"), temporary, str(tmp_path)) is None
    monkeypatch.setattr(checkpoints, "free_space", lambda folder: 1024)
    full = checkpoints.disk_full_error(writer, temporary, str(tmp_path))
    assert full.errno == 28 and "0.0 MiB free" in str(full) and "checkpoint-2, is intact" in str(full)


def test_checkpoint_weights_for_evaluation_are_the_ema_or_the_trained_ones(tmp_path):
    from safetensors.torch import save_file

    from diffusers_pixnerd.training import load_checkpoint_weights
    from diffusers_pixnerd.training.ema import create_ema, save_ema

    trained, evaluated = tiny_c2i(), tiny_c2i()
    randomize_(trained)
    save_file(
        {f"transformer.{k}": v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "model.safetensors"
    )
    ema = create_ema(trained.parameters(), decay=0.5)
    with torch.no_grad():
        for shadow in ema.shadow_params:
            shadow.mul_(2.0)
    save_ema(ema, str(tmp_path / "ema.safetensors"))
    assert load_checkpoint_weights(evaluated, str(tmp_path)) == "ema"
    assert all(torch.equal(a, 2.0 * b) for a, b in zip(evaluated.parameters(), trained.parameters()))
    assert load_checkpoint_weights(evaluated, str(tmp_path), use_ema=False) == "trained"
    assert all(torch.equal(a, b) for a, b in zip(evaluated.parameters(), trained.parameters()))


# ------------------------------------------------------------------------------------------ the printed resume command


def test_the_resume_command_uses_this_interpreter_and_gives_each_flag_once(monkeypatch, not_launched):
    """A repeated flag keeps its last value at its last place (what argparse used); other flags keep their order, so
    `--use_ema ... --no_use_ema` still means off."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = ["examples/train.py", "--max_train_steps", "3", "--logit_mean", "-0.5", "--use_ema", "--output_dir"]
    argv += [
        "my out",
        "--overwrite_output_dir",
        "--no_use_ema",
        "--max_train_steps=6",
        "--resume_from_checkpoint",
        "x",
    ]
    expected = [sys.executable, "examples/train.py", "--logit_mean", "-0.5", "--use_ema", "--output_dir", "my out"]
    expected += ["--no_use_ema", "--max_train_steps=6", "--resume_from_checkpoint", "latest"]
    assert resume_command(argv) == shlex.join(expected)


def test_the_resume_command_keeps_the_thread_setting(monkeypatch, not_launched):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    command = resume_command(["train.py", "--seed", "0"])
    python = shlex.quote(sys.executable)
    assert command == f"OMP_NUM_THREADS=2 {python} train.py --seed 0 --resume_from_checkpoint latest"


def test_a_launched_run_takes_the_thread_setting_of_the_launcher(monkeypatch):
    """`accelerate launch` sets OMP_NUM_THREADS in the processes it starts when it was not set: the command leaves it
    out when the launcher's environment did not have it."""
    import psutil

    command = ["accelerate", "launch", "--cpu", "train.py", "--seed", "0"]
    launcher = SimpleNamespace(cmdline=lambda: command, environ=dict)
    monkeypatch.setattr(psutil, "Process", lambda pid: launcher)
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what accelerate put in this process's environment
    expected = "accelerate launch --cpu train.py --seed 0 --resume_from_checkpoint latest"
    assert resume_command(["train.py", "--seed", "0"]) == expected


def test_the_resume_command_of_an_accelerate_launch_repeats_the_launcher(tmp_path):
    """Two processes through `accelerate launch --multi_gpu` (CPU DDP: torchrun's agent inside the launcher starts
    them): the command is the launcher's own, with its flags, and the OMP_NUM_THREADS set where it was started."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "2"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "--main_process_port"]
    launcher += [str(free_port())]
    flags = ["--max_train_steps", "3", "--seed", "0", "--max_train_steps", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "3"}
    result = subprocess.run(
        [*launcher, str(child), *flags], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = [line[len("RESUME: ") :] for line in result.stdout.splitlines() if line.startswith("RESUME: ")]
    expected = shlex.join([*launcher, str(child), "--seed", "0", "--max_train_steps", "5"])
    assert printed == [f"OMP_NUM_THREADS=3 {expected} --resume_from_checkpoint latest"]
