"""examples/train_pixnerd_c2i.py end to end: `accelerate launch` in subprocesses (1 and 2 processes, CPU DDP over
gloo), in-process runs of `main` for the failure paths, stopping and continuing, sharing, faults while checkpointing.
Tiny models, 8..24 px images made by the `assets` fixture, no network."""

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdPipeline
from diffusers_pixnerd.training.ema import load_ema_state

from ..helpers import C2I_SCRIPT, ROOT, TINY_MODEL, c2i_args, exported_weights, launch, save_image
from ..helpers import sample_two_steps as sample

# --------------------------------------------------------------------------------------------------- accelerate launch


def test_c2i_two_processes_with_repa_ema_validation_and_export(assets, tmp_path):
    out = tmp_path / "c2i"
    log = launch(
        C2I_SCRIPT,
        c2i_args(
            assets,
            out,
            "--max_train_steps",
            4,
            "--checkpointing_steps",
            2,
            "--validation_steps",
            2,
            "--ema_decay",
            0.5,
            "--random_flip",
            "--gradient_checkpointing",
            "--dataloader_num_workers",
            1,
            "--report_to",
            "tensorboard",
            "--model_config",
            "PixNerd-L/16",
            "--model_config_json",
            json.dumps(TINY_MODEL),  # a preset, made tiny
        ),
        tmp_path,
        num_processes=2,
    )
    # Real DDP: two processes in one world, the same weights on both after a step.
    assert "Processes: 2 (DistributedType.MULTI_CPU)" in log
    assert "World size 2: all processes hold identical weights after step 1" in log
    # The unreadable image is skipped, counted and named, and training goes on.
    assert "Skipping unreadable image" in log and "broken.png" in log
    assert "Unreadable images skipped so far" in log
    # Checkpoints hold the REPA projector and the EMA; the export holds the EMA weights and no projector.
    checkpoint = load_file(out / "checkpoint-4" / "model.safetensors")
    assert any(k.startswith("projector.") for k in checkpoint)
    ema = load_ema_state(str(out / "checkpoint-4" / "ema.safetensors"))["shadow_params"]
    pipe = PixNerdPipeline.from_pretrained(out)
    exported = list(pipe.transformer.parameters())
    assert len(exported) == len(ema) and all(torch.equal(p, e) for p, e in zip(exported, ema))
    trained = [checkpoint[f"transformer.{name}"] for name, _ in pipe.transformer.named_parameters()]
    assert not all(torch.equal(p, t) for p, t in zip(exported, trained))
    assert not any("projector" in f for f in os.listdir(out / "transformer"))
    # Class names from the folders, and the pipeline samples by name.
    assert pipe.config.id2label == {"0": "cat", "1": "dog", "2": "fish"}
    assert torch.isfinite(sample(pipe, "fish")).all()
    # Validation images: saved, logged to TensorBoard, shown in the model card.
    assert sorted(os.listdir(out / "validation")) == ["final", "step-0", "step-2", "step-4"]
    assert len(os.listdir(out / "validation" / "final")) == 3
    events = [os.path.join(d, f) for d, _, files in os.walk(out / "logs") for f in files if "tfevents" in f]
    assert any(b"validation" in open(f, "rb").read() for f in events)
    card = (out / "README.md").read_text()
    assert "## Training" in card and "validation/final/00_cat.png" in card and "`use_repa` | `True`" in card


def test_c2i_resumed_run_ends_in_the_same_state(assets, tmp_path):
    """Stop after checkpoint-2 (here: a copy of it in a fresh folder) and resume: model, EMA, optimizer, lr schedule
    and step equal the uninterrupted run's at step 4, across an epoch boundary and with gradient accumulation."""
    common = [
        "--dataset_name",
        assets / "hub",
        "--image_column",
        "img",
        "--label_column",
        "cls",
        "--train_batch_size",
        1,
        "--gradient_accumulation_steps",
        2,
        "--max_train_steps",
        4,
        "--checkpointing_steps",
        2,
        "--random_flip",
        "--ema_decay",
        0.5,
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        1,
        "--max_grad_norm",
        1.0,
    ]
    args = c2i_args(assets, tmp_path / "full", *common)
    args[args.index("--train_data_dir") : args.index("--train_data_dir") + 2] = []
    launch(C2I_SCRIPT, args, tmp_path)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args[args.index("--output_dir") + 1] = resumed
    log = launch(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"], tmp_path)
    assert "Resuming from" in log and "checkpoint-2 (step 2)" in log
    a, b = full / "checkpoint-4", resumed / "checkpoint-4"
    model_a, model_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    ema_a, ema_b = load_ema_state(str(a / "ema.safetensors")), load_ema_state(str(b / "ema.safetensors"))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    opt_a, opt_b = (torch.load(c / "optimizer.bin", weights_only=False) for c in (a, b))
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[name], opt_b["state"][key][name]) for name in state)
    sched_a, sched_b = (torch.load(c / "scheduler.bin", weights_only=False) for c in (a, b))
    assert sched_a == sched_b and sched_a["last_epoch"] == 4
    assert json.loads((b / "training_state.json").read_text())["global_step"] == 4
    # The run really moved: the state at step 4 is not the state at step 2.
    model_2 = load_file(full / "checkpoint-2" / "model.safetensors")
    assert not all(torch.equal(model_2[k], model_a[k]) for k in model_a)


# ----------------------------------------------------------------------------------------------- failures (in process)


def test_an_earlier_run_needs_resume_or_overwrite(assets, tmp_path, run_main):
    os.makedirs(tmp_path / "out" / "checkpoint-3")
    (tmp_path / "out" / "checkpoint-3" / "training_state.json").write_text("{}")
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest.*--overwrite_output_dir"):
        run_main(C2I_SCRIPT, c2i_args(assets, tmp_path / "out", "--max_train_steps", 1))


def test_a_flat_folder_is_reported_before_training(assets, tmp_path, run_main):
    save_image(tmp_path / "flat" / "0.png", 16, 16, seed=0)
    args = c2i_args(assets, tmp_path / "out", "--max_train_steps", 1)
    args[args.index("--train_data_dir") + 1] = tmp_path / "flat"
    with pytest.raises(ValueError, match="one subfolder per class"):
        run_main(C2I_SCRIPT, args)
    assert os.listdir(tmp_path / "out") == []


def test_corrupt_images_are_fatal_on_request(assets, tmp_path, run_main):
    args = c2i_args(assets, tmp_path / "out", "--max_train_steps", 3, "--fail_on_corrupt_images", "--no_use_repa")
    with pytest.raises(RuntimeError, match="broken.png"):
        run_main(C2I_SCRIPT, args)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(
        assets, out, "--max_train_steps", 5, "--checkpointing_steps", 1, "--learning_rate", 1e30, "--no_use_repa"
    )
    with pytest.raises(FloatingPointError, match="Non-finite loss at step 2.*checkpoint-1"):
        run_main(C2I_SCRIPT, args)
    assert sorted(os.listdir(out)) == ["checkpoint-1"]
    assert json.loads((out / "checkpoint-1" / "training_state.json").read_text())["global_step"] == 1


def test_ema_warmup_flag_and_the_warning_for_a_constant_decay_from_scratch(assets, tmp_path, run_main, caplog):
    out = tmp_path / "warmup"
    args = c2i_args(
        assets, out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--no_use_repa", "--ema_decay", 0.5
    )
    run_main(C2I_SCRIPT, [*args, "--ema_warmup"])
    ema = load_ema_state(str(out / "checkpoint-2" / "ema.safetensors"))
    # diffusers' ramp (its arithmetic is checked in tests/training/test_ema.py), saved with the EMA so a resume keeps it.
    assert (ema["decay"], ema["min_decay"], ema["update_after_step"], ema["optimization_step"]) == (0.5, 0.0, 0, 2)
    assert "starting weights still make up" not in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        args = c2i_args(assets, tmp_path / "constant", "--max_train_steps", 1, "--no_use_repa", "--ema_decay", 0.9999)
        run_main(C2I_SCRIPT, args)
    assert "still make up 100% of the exported EMA after 1 steps" in caplog.text


def test_a_kill_during_a_save_leaves_the_latest_checkpoint_intact(assets, tmp_path, run_main, monkeypatch):
    from accelerate import Accelerator

    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--no_use_repa")
    save_state = Accelerator.save_state

    def killed_while_saving_step_4(self, output_dir=None, **kwargs):
        save_state(self, output_dir, **kwargs)
        if str(output_dir).endswith("checkpoint-4.tmp"):
            raise KeyboardInterrupt  # the state is written, the EMA and the rename are not

    monkeypatch.setattr(Accelerator, "save_state", killed_while_saving_step_4)
    with pytest.raises(KeyboardInterrupt):
        run_main(C2I_SCRIPT, args)
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-4.tmp"]
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])  # resumes from checkpoint-2
    assert {"checkpoint-2", "checkpoint-4", "model_index.json"} <= set(os.listdir(out))
    assert "checkpoint-4.tmp" not in os.listdir(out)


def test_a_streamed_dataset_trains_and_resumes(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--streaming", "--max_train_steps", 2, "--checkpointing_steps", 1, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    assert {"checkpoint-1", "checkpoint-2", "model_index.json"} <= set(os.listdir(out))
    args[args.index("--max_train_steps") + 1] = 3
    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["global_step"] == 3


def test_a_missing_repa_encoder_stops_the_run_before_the_data_and_model_load(assets, tmp_path, run_main):
    args = c2i_args(assets, tmp_path / "out", "--max_train_steps", 1)
    args[args.index("--repa_encoder") + 1] = tmp_path / "no-dinov2-here"
    args[args.index("--train_data_dir") + 1] = tmp_path / "no-data-either"  # would fail first if the data loaded first
    with pytest.raises(ValueError, match=r"`--repa_encoder` .*no-dinov2-here.*`--no_use_repa`"):
        run_main(C2I_SCRIPT, args)


# --------------------------------------------------------------------------------------------- stopping and continuing


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_and_prints_the_resume_command(
    assets, tmp_path, run_main, monkeypatch, caplog, signal_name
):
    import signal

    from diffusers_pixnerd.training import loop

    signum = getattr(signal, signal_name)
    default_handler = signal.getsignal(signum)

    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 6, "--checkpointing_steps", 100, "--no_use_repa")
    log = loop.TrainingRun.log

    def log_then_signal(self):
        log(self)
        if self.global_step == 2:
            os.kill(os.getpid(), signum)  # as `kill PID`, a cluster's time limit or Ctrl-C would

    monkeypatch.setattr(loop.TrainingRun, "log", log_then_signal)
    monkeypatch.setattr(sys, "argv", ["train_pixnerd_c2i.py", *map(str, args)])
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as stopped:
        run_main(C2I_SCRIPT, args)
    assert stopped.value.code == 128 + signum
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # saved at the step it stopped, nothing exported
    assert f"Stopped by {signal_name} after step 2" in caplog.text
    assert "train_pixnerd_c2i.py" in caplog.text and caplog.text.count("--resume_from_checkpoint latest") == 1
    assert signal.getsignal(signum) is default_handler  # the handlers are put back

    monkeypatch.setattr(loop.TrainingRun, "log", log)
    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    assert {"checkpoint-2", "checkpoint-6", "model_index.json"} <= set(os.listdir(out))


def test_a_finished_run_continues_from_its_last_step(assets, tmp_path, run_main, caplog):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 3, "--checkpointing_steps", 100, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    assert {"checkpoint-3", "model_index.json"} <= set(os.listdir(out))  # the last step is always checkpointed
    args[args.index("--max_train_steps") + 1] = 5
    with caplog.at_level(logging.INFO):
        run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    assert "Resuming from" in caplog.text and "checkpoint-3 (step 3)" in caplog.text
    assert json.loads((out / "checkpoint-5" / "training_state.json").read_text())["global_step"] == 5


def test_a_continuation_stopped_by_ctrl_c_prints_its_flags_once_and_marks_the_old_export(
    assets, tmp_path, run_main, monkeypatch, caplog, not_launched
):
    """A finished 3-step run, continued to 6 steps by appending `--max_train_steps 6`, stopped at step 4: the printed
    command gives `--max_train_steps 6` once; the export of step 3 stays, its card marked as outdated, until the
    resumed run finishes and exports again."""
    from diffusers_pixnerd.training import loop

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    args = list(map(str, c2i_args(assets, out, "--max_train_steps", 3, "--checkpointing_steps", 100, "--no_use_repa")))
    run_main(C2I_SCRIPT, args)
    card = (out / "README.md").read_text()
    assert "Outdated export" not in card and "for 3 steps" in card
    # No absolute path in the card: the data folder and the config file given as absolute paths show their names.
    assert str(assets) not in card and str(tmp_path) not in card
    assert "| `train_data_dir` | `classes` |" in card and "| `model_config` | `tiny.json` |" in card
    assert "given as absolute paths are shown by their name" in card
    assert 'PixNerdPipeline.from_pretrained("out")' in card and "path/to/this/folder" not in card

    log = loop.TrainingRun.log

    def log_then_interrupt(self):
        log(self)
        if self.global_step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop.TrainingRun, "log", log_then_interrupt)
    continued = [*args, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"]
    monkeypatch.setattr(sys, "argv", ["train_pixnerd_c2i.py", *continued])
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):
        run_main(C2I_SCRIPT, continued)
    printed = caplog.text.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert printed.startswith(f"OMP_NUM_THREADS=1 {shlex.quote(sys.executable)} train_pixnerd_c2i.py ")
    assert printed.count("--max_train_steps") == 1 and "--max_train_steps 6 " in printed
    assert printed.endswith("--resume_from_checkpoint latest")
    assert "The model exported in" in caplog.text and "is older than checkpoint-4" in caplog.text
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "\nlibrary_name: diffusers\n" in card.split("\n---\n", 1)[0]  # metadata first
    assert "**Outdated export.**" in card and "saved `checkpoint-4`" in card and "for 3 steps" in card
    assert (out / "model_index.json").exists()  # kept: the only finished model until the continuation ends

    monkeypatch.setattr(loop.TrainingRun, "log", log)
    run_main(C2I_SCRIPT, shlex.split(printed)[3:])  # the printed flags, after the interpreter and the script
    card = (out / "README.md").read_text()
    assert "Outdated export" not in card and "for 6 steps" in card


def test_resuming_a_checkpoint_whose_ema_file_is_missing_names_it_and_the_earlier_ones(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--no_use_repa", "--use_ema")
    run_main(C2I_SCRIPT, args)
    assert json.loads((out / "checkpoint-4" / "training_state.json").read_text())["ema"] is True
    os.remove(out / "checkpoint-4" / "ema.safetensors")
    args[args.index("--max_train_steps") + 1] = 6
    with pytest.raises(
        FileNotFoundError,
        match=r"checkpoint-4/ema.safetensors is missing: the run that wrote .* "
        r"trained with an EMA.*earlier checkpoint \(.*checkpoint-2\)",
    ):
        run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    # The earlier checkpoint, named there, resumes.
    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", out / "checkpoint-2"])
    assert json.loads((out / "checkpoint-6" / "training_state.json").read_text())["global_step"] == 6


def test_resuming_an_export_without_checkpoints_is_an_error(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 1, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    shutil.rmtree(out / "checkpoint-1")
    with pytest.raises(ValueError, match="holds an exported model .* but no checkpoint"):
        run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    assert (out / "model_index.json").exists()


def test_two_runs_cannot_write_into_one_output_dir(assets, tmp_path, run_main):
    import fcntl

    out = tmp_path / "out"
    os.makedirs(out)
    other_run = os.open(out, os.O_RDONLY)  # what a running training holds
    fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(RuntimeError, match="Another training run is writing into `--output_dir`"):
            run_main(C2I_SCRIPT, c2i_args(assets, out, "--max_train_steps", 1, "--no_use_repa"))
    finally:
        os.close(other_run)
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------------------------------------- sharing


def test_push_to_hub_checks_the_repo_id_and_token_before_training(assets, tmp_path, run_main, monkeypatch):
    import huggingface_hub

    def rejected(token=None):
        raise OSError("401 Unauthorized")

    monkeypatch.setattr(huggingface_hub, "whoami", rejected)
    args = c2i_args(assets, tmp_path / "out", "--max_train_steps", 1, "--no_use_repa", "--push_to_hub")
    with pytest.raises(ValueError, match="`--push_to_hub`: the Hub did not accept the token"):
        run_main(C2I_SCRIPT, args)
    with pytest.raises(ValueError, match="`--hub_model_id` 'not a/valid//id' is not a valid Hub repo id"):
        run_main(C2I_SCRIPT, [*args, "--hub_model_id", "not a/valid//id"])
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_a_hub_problem_stops_the_script_before_training_without_a_traceback(tmp_path):
    """The script as a user runs it, with no token (an empty HF_HOME) in offline mode."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1")
    out = tmp_path / "out"
    command = [sys.executable, C2I_SCRIPT, "--train_data_dir", tmp_path, "--output_dir", out, "--push_to_hub"]
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: `--push_to_hub`: no Hugging Face token found." in result.stderr
    assert "Offline mode is on too (`HF_HUB_OFFLINE=1`)" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_the_pushed_card_names_the_real_repo_and_survives_a_reload_and_push(assets, tmp_path, run_main, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub

    from diffusers_pixnerd.pipelines import pipeline_utils

    monkeypatch.setattr(huggingface_hub, "whoami", lambda token=None: {"name": "me"})
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: None)
    out = tmp_path / "my-run"
    run_main(C2I_SCRIPT, c2i_args(assets, out, "--max_train_steps", 1, "--no_use_repa", "--push_to_hub"))
    card = (out / "README.md").read_text()
    assert 'from_pretrained("me/my-run")' in card and "## Training" in card and "## Samples" in card
    samples = [line for line in card.splitlines() if line.startswith("![")]
    assert samples and all("validation/final/" in line for line in samples)

    uploaded = {}

    def upload(self, folder, repo_id, **kwargs):  # what push_to_hub of the reloaded pipeline sends
        uploaded["card"] = open(os.path.join(folder, "README.md")).read()
        uploaded["files"] = {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs}

    monkeypatch.setattr(pipeline_utils, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(PixNerdPipeline, "_upload_folder", upload, raising=False)
    PixNerdPipeline.from_pretrained(out).push_to_hub("me/my-run-copy")
    assert "## Training" in uploaded["card"] and "Exported: the EMA" in uploaded["card"]
    assert 'from_pretrained("me/my-run-copy")' in uploaded["card"]
    for line in samples:
        assert line in uploaded["card"]
        assert line.split("](")[1].rstrip(")") in uploaded["files"]  # the sample images come along


# ----------------------------------------------------------------------------------------------------- data and labels


def test_validation_class_labels_take_names(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 1, "--no_use_repa", "--validation_class_labels", "dog", 0)
    run_main(C2I_SCRIPT, args)
    assert sorted(os.listdir(out / "validation" / "final")) == ["00_dog.png", "01_cat.png"]
    with pytest.raises(ValueError, match="`--validation_class_labels`: Unknown class name 'dgo'.*'dog'"):
        run_main(C2I_SCRIPT, [*args[:-2], "dgo", "--overwrite_output_dir"])


def test_class_names_must_match_the_classes_of_the_data(assets, tmp_path, run_main):
    args = c2i_args(assets, tmp_path / "out", "--max_train_steps", 1, "--no_use_repa")
    with pytest.raises(
        ValueError, match="`--class_names` gives 2 names but the data has 3 classes \\(cat, dog, fish\\)"
    ):
        run_main(C2I_SCRIPT, [*args, "--class_names", "cat,dog"])
    run_main(C2I_SCRIPT, [*args, "--class_names", "Cat,Dog,Fish"])  # as many names as classes: they are used
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())["id2label"]["2"] == "Fish"


# ------------------------------------------------------------------------------------------ faults while checkpointing


def test_a_kill_while_replacing_a_checkpoint_leaves_a_complete_one(assets, tmp_path, run_main, monkeypatch):
    """A run resumed from checkpoint-2 saves step 4 again: the old checkpoint-4 is moved aside, the new one renamed
    in, the old deleted. Killed between the two renames, the next start restores the old checkpoint-4."""
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    old_state = (out / "checkpoint-4" / "model.safetensors").read_bytes()
    rename = os.rename

    def killed_after_moving_the_old_one_aside(source, target):
        rename(source, target)
        if str(target).endswith("checkpoint-4.old"):
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", killed_after_moving_the_old_one_aside)
    with pytest.raises(KeyboardInterrupt):
        run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "checkpoint-2"])
    monkeypatch.setattr(os, "rename", rename)
    assert {"checkpoint-2", "checkpoint-4.old", "checkpoint-4.tmp"} <= set(os.listdir(out))
    assert "checkpoint-4" not in os.listdir(out)

    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])  # restores checkpoint-4, nothing to train
    names = set(os.listdir(out))
    assert "checkpoint-4" in names and not {"checkpoint-4.old", "checkpoint-4.tmp"} & names
    assert (out / "checkpoint-4" / "model.safetensors").read_bytes() == old_state


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device"),  # 28: ENOSPC
        # torch's zip writer on a full disk; only the free space tells it from another write error
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024"),
    ],
)
def test_a_full_disk_names_the_checkpoint_and_the_run_resumes_to_the_same_end(
    assets, tmp_path, run_main, monkeypatch, error
):
    from accelerate import Accelerator

    from diffusers_pixnerd.training import checkpoints

    reference, out = tmp_path / "reference", tmp_path / "out"
    run_main(
        C2I_SCRIPT, c2i_args(assets, reference, "--max_train_steps", 4, "--checkpointing_steps", 2, "--no_use_repa")
    )
    args = c2i_args(assets, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--no_use_repa")
    save_state = Accelerator.save_state

    def disk_full_at_step_4(self, output_dir=None, **kwargs):
        if str(output_dir).endswith("checkpoint-4.tmp"):
            os.makedirs(output_dir, exist_ok=True)
            (tmp_path / "out" / "checkpoint-4.tmp" / "model.safetensors").write_bytes(b"half written")
            raise error
        return save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", disk_full_at_step_4)
    monkeypatch.setattr(checkpoints, "free_space", lambda folder: 1024)  # 1 KiB left
    message = (
        r"The disk is full: could not write .*checkpoint-4 .*The disk holding .*out has 0.0 MiB free; a checkpoint of "
        r"this run takes about \d+\.\d MiB\. The last complete checkpoint, .*checkpoint-2, is intact"
    )
    with pytest.raises(OSError, match=message):
        run_main(C2I_SCRIPT, args)
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    monkeypatch.setattr(Accelerator, "save_state", save_state)
    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    resumed, uninterrupted = exported_weights(out), exported_weights(reference)
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


def test_overwrite_keeps_the_old_checkpoints_until_the_new_run_has_one(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    broken = list(args)
    broken[broken.index("--train_data_dir") + 1] = tmp_path / "missing"
    with pytest.raises(ValueError):
        run_main(C2I_SCRIPT, [*broken, "--overwrite_output_dir"])  # fails to start: nothing is deleted
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    run_main(
        C2I_SCRIPT,
        [
            *args[: args.index("--max_train_steps")],
            "--max_train_steps",
            1,
            *args[args.index("--max_train_steps") + 2 :],
            "--overwrite_output_dir",
        ],
    )
    checkpoints = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-1"]  # the earlier run's went once the new run had committed one
    assert json.loads((out / "checkpoint-1" / "training_state.json").read_text())["global_step"] == 1


class Payload:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_no_pickle_runs_when_resuming_a_planted_checkpoint(assets, tmp_path, run_main, monkeypatch, force_unsafe_env):
    """Every pickle-format file a resume reads (Accelerate's optimizer, lr schedule, RNG and sampler states) is read
    weights-only, also under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD; the package's own files are safetensors and JSON."""
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 2, "--checkpointing_steps", 100, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "ema.safetensors").is_file() and not (checkpoint / "ema.pt").exists()
    pickled = sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".bin", ".pkl", ".pt"))
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"} <= set(pickled)
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    args[args.index("--max_train_steps") + 1] = 3
    for name in pickled:
        planted = tmp_path / f"planted-{name}"
        shutil.copytree(checkpoint, planted / "checkpoint-2")
        marker = tmp_path / f"ran-{name}"
        torch.save(Payload(marker), planted / "checkpoint-2" / name)
        planted_args = [*args, "--resume_from_checkpoint", "latest"]
        planted_args[planted_args.index("--output_dir") + 1] = planted
        with pytest.raises(Exception, match=r"(?i)weights[_ ]only|unpickl|unsupported global"):
            run_main(C2I_SCRIPT, planted_args)
        assert not marker.exists(), f"a payload in {name} ran"
        assert (planted / "checkpoint-2" / "training_state.json").is_file()  # the checkpoint is left as it was


def test_a_malformed_training_state_names_the_file(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 1, "--checkpointing_steps", 100, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    args[args.index("--max_train_steps") + 1] = 2
    state = out / "checkpoint-1" / "training_state.json"
    for text, message in (
        ("{not json", "not valid JSON"),
        ("[1, 2]", "global_step"),
        ('{"global_step": "x"}', "global_step"),
    ):
        state.write_text(text)
        with pytest.raises(ValueError, match=rf"training_state\.json.*{message}"):
            run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])


def test_bad_model_config_json_and_resolution_name_the_flag(assets, tmp_path, run_main):
    base = c2i_args(assets, tmp_path / "out", "--max_train_steps", 1, "--no_use_repa")
    cases = [
        (["--model_config_json", '{"num_layers": 2,'], r"`--model_config_json` is not valid JSON.*line 1"),
        (["--model_config_json", "[2]"], r"`--model_config_json` must be a JSON object"),
        (["--model_config_json", '{"num_layer": 2}'], r"`--model_config_json`.*unknown.*num_layer.*num_layers"),
        (["--resolution", 18], r"`--resolution` \(18\) must be a multiple of the model's patch size \(4\)"),
    ]
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            run_main(C2I_SCRIPT, [*base, *extra])
    bad_file = tmp_path / "bad.json"
    bad_file.write_text('{"num_layers": 2\n "x": 1}')
    args = list(base)
    args[args.index("--model_config") + 1] = bad_file
    with pytest.raises(ValueError, match=r"`--model_config` .*bad\.json.*line 2"):
        run_main(C2I_SCRIPT, args)
