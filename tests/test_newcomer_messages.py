"""What a newcomer meets around the training scripts: `--push_to_hub` problems named before training (no token,
offline mode, a rejected token, a repo the token cannot write to), the resume command printed after a stop, `--help`
with defaults and a text for every flag, `--image_preprocessing pad` saying how many images it scaled down, model
cards without placeholders or absolute paths and marked when a later run outdates them, and the Fashion-MNIST data
prerequisite in the docs. No network: the Hub calls are monkeypatched or stopped by offline mode."""

import argparse
import importlib.util
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_C2I
from test_train_scripts import (  # noqa: F401 - `assets` and `run_main` are fixtures used here
    C2I_SCRIPT,
    ROOT,
    T2I_SCRIPT,
    assets,
    c2i_args,
    free_port,
    run_main,
)

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.training import (
    HubAccessError,
    ImageSampleDataset,
    collate_samples,
    lora_model_card,
    upload_output_dir,
)
from diffusers_pixnerd.training.checkpoints import resume_command
from diffusers_pixnerd.training.hub import check_hub_access, upload_ignore_patterns


# ------------------------------------------------------------------------------------------------- --push_to_hub


def hub_args(tmp_path, **overrides) -> argparse.Namespace:
    return argparse.Namespace(
        **{"hub_model_id": None, "hub_token": None, "output_dir": str(tmp_path / "my-run"), **overrides}
    )


def fake_whoami(info):
    def whoami(token=None):
        return info

    return whoami


@pytest.fixture
def no_env_token(monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def test_push_to_hub_without_a_token_says_how_to_log_in(tmp_path, monkeypatch, no_env_token):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.hf_api, "get_token", lambda: None)  # the real whoami, no token anywhere
    with pytest.raises(HubAccessError, match=r"`--push_to_hub`: no Hugging Face token found\. .*`hf auth login`"):
        check_hub_access(hub_args(tmp_path))


def test_push_to_hub_in_offline_mode_says_offline(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.hf_api, "get_token", lambda: "hf_a_token")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # the real whoami stops before the request
    with pytest.raises(HubAccessError, match=r"`--push_to_hub`: offline mode is on \(`HF_HUB_OFFLINE=1`\)"):
        check_hub_access(hub_args(tmp_path))


@pytest.mark.parametrize("hub_token, source", [(None, "`hf auth login`"), ("hf_mistyped", "`--hub_token`")])
def test_push_to_hub_with_a_rejected_token_names_where_the_token_came_from(
    tmp_path, monkeypatch, no_env_token, hub_token, source
):
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    def rejected(token=None):  # what whoami raises on the Hub's 401
        raise HfHubHTTPError("Invalid user token.", response=SimpleNamespace(status_code=401, headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "whoami", rejected)
    with pytest.raises(HubAccessError, match=f"`--push_to_hub`: the Hub rejected the token from {re.escape(source)}"):
        check_hub_access(hub_args(tmp_path, hub_token=hub_token))


WRITE_TOKEN = {"auth": {"accessToken": {"role": "write"}}}
FINE_GRAINED_ON_ME = {
    "role": "fineGrained",
    "fineGrained": {"scoped": [{"entity": {"type": "user", "name": "me"}, "permissions": ["repo.write"]}]},
}
NOT_WRITABLE = [  # (whoami's answer, --hub_model_id, the message after "`--push_to_hub`: ")
    (
        {"name": "me", "orgs": [], **WRITE_TOKEN},
        "someone-else/model",
        r"the repo 'someone-else/model' is not writable with the token from `hf auth login`: it belongs to 'me', who "
        r"is not 'someone-else' nor a member of it .* e\.g\. `--hub_model_id me/model`",
    ),
    (
        {"name": "me", "orgs": [{"name": "lab", "roleInOrg": "read"}], **WRITE_TOKEN},
        "lab/model",
        r"the repo 'lab/model' is not writable: 'me' only has read access in the organisation 'lab'",
    ),
    ({"name": "me", "auth": {"accessToken": {"role": "read"}}}, None, r"the token from `hf auth login` is read-only"),
    (
        {"name": "me", "orgs": [{"name": "lab"}], "auth": {"accessToken": FINE_GRAINED_ON_ME}},
        "lab/model",
        r"the repo 'lab/model' is not writable with the fine-grained token .* no `repo.write` permission on 'lab'",
    ),
]


@pytest.mark.parametrize("info, hub_model_id, message", NOT_WRITABLE)
def test_push_to_hub_to_a_repo_the_token_cannot_write_is_refused(
    tmp_path, monkeypatch, no_env_token, info, hub_model_id, message
):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "whoami", fake_whoami(info))
    with pytest.raises(HubAccessError, match="`--push_to_hub`: " + message):
        check_hub_access(hub_args(tmp_path, hub_model_id=hub_model_id))


def test_push_to_hub_accepts_the_repos_the_token_can_write(tmp_path, monkeypatch):
    import huggingface_hub

    scoped = [{"entity": {"type": "org", "name": "lab"}, "permissions": ["repo.content.read", "repo.write"]}]
    fine_grained = {"role": "fineGrained", "fineGrained": {"scoped": scoped}}
    member = {"name": "me", "orgs": [{"name": "lab", "roleInOrg": "write"}], **WRITE_TOKEN}
    monkeypatch.setattr(huggingface_hub, "whoami", fake_whoami(member))
    assert check_hub_access(hub_args(tmp_path)) == "me/my-run"  # the folder's name under the user
    assert check_hub_access(hub_args(tmp_path, hub_model_id="lab/model")) == "lab/model"
    monkeypatch.setattr(huggingface_hub, "whoami", fake_whoami({**member, "auth": {"accessToken": fine_grained}}))
    assert check_hub_access(hub_args(tmp_path, hub_model_id="lab/model")) == "lab/model"


def test_a_refused_flag_is_one_line_naming_it_and_what_to_use_instead_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    command = [
        sys.executable, T2I_SCRIPT, "--pretrained_model_name_or_path", tmp_path, "--train_data_dir", tmp_path,
        "--output_dir", out, "--aspect_ratio_buckets", "--reg_data_dir", tmp_path,
    ]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: `--reg_data_dir`/`--reg_prompts_file` mix square `--resolution` images" in result.stderr
    assert "leave `--aspect_ratio_buckets` out, and `--image_preprocessing pad` keeps non-square images" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


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


def test_the_documented_upload_of_a_trained_folder_leaves_the_checkpoints_out(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    folder = tmp_path / "my-run"
    files = [
        "README.md",
        "model_index.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "validation/final/00_cat.png",
        "validation/step-0/00_cat.png",  # the baseline the card shows beside the final samples
        "checkpoint-500/model.safetensors",
        "checkpoint-600.tmp/model.safetensors",
        "logs/pixnerd-c2i/events.out",
        "validation/step-500/00_cat.png",
        "cache/prompt_embeds_0.arrow",
    ]
    for name in files:
        os.makedirs(os.path.dirname(folder / name), exist_ok=True)
        (folder / name).write_text("x")
    sent = {}

    def upload_folder(repo_id, folder_path, ignore_patterns, **kwargs):
        found = [os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs]
        sent[repo_id] = sorted(filter_repo_objects(found, ignore_patterns=ignore_patterns))

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    assert upload_output_dir(str(folder), "me/my-run") == "me/my-run"
    assert sent["me/my-run"] == sorted(files[:5])

    # docs/training.md gives the same patterns to `hf upload`.
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        line = next(line for line in f if line.startswith("hf upload "))
    words = shlex.split(line)
    assert [words[i + 1] for i, w in enumerate(words) if w == "--exclude"] == upload_ignore_patterns()


# -------------------------------------------------------------------------------------- the printed resume command


@pytest.fixture
def not_launched(monkeypatch):
    for name in ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_the_resume_command_uses_this_interpreter_and_gives_each_flag_once(monkeypatch, not_launched):
    """A repeated flag keeps its last value at its last place (what argparse used); other flags keep their order, so
    `--use_ema ... --no_use_ema` still means off."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    argv = ["examples/train.py", "--max_train_steps", "3", "--logit_mean", "-0.5", "--use_ema", "--output_dir"]
    argv += ["my out", "--overwrite_output_dir", "--no_use_ema", "--max_train_steps=6", "--resume_from_checkpoint", "x"]
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


CHILD = """import os
from diffusers_pixnerd.training.checkpoints import resume_command
if os.environ.get("RANK", "0") == "0":
    print("RESUME:", resume_command())
"""


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
    assert card.startswith("---\nlibrary_name: diffusers")  # the metadata block stays first
    assert "**Outdated export.**" in card and "saved `checkpoint-4`" in card and "for 3 steps" in card
    assert (out / "model_index.json").exists()  # kept: the only finished model until the continuation ends

    monkeypatch.setattr(loop.TrainingRun, "log", log)
    run_main(C2I_SCRIPT, shlex.split(printed)[3:])  # the printed flags, after the interpreter and the script
    card = (out / "README.md").read_text()
    assert "Outdated export" not in card and "for 6 steps" in card


# ------------------------------------------------------------------------------------------------------------ --help


class ParserCaptured(Exception):
    pass


def script_parser(script, monkeypatch) -> argparse.ArgumentParser:
    """The parser that a script's `parse_args` builds (caught where it would parse)."""
    captured = {}

    def capture(self, args=None, namespace=None):
        captured["parser"] = self
        raise ParserCaptured

    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(ParserCaptured):
        module.parse_args([])
    return captured["parser"]


@pytest.mark.parametrize("script", [C2I_SCRIPT, T2I_SCRIPT])
def test_every_flag_has_a_help_text_and_help_shows_the_defaults(script, monkeypatch):
    parser = script_parser(script, monkeypatch)
    flags = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert len(flags) > 60
    without_help = [action.option_strings[0] for action in flags if not (action.help or "").strip()]
    assert without_help == [], without_help
    text = " ".join(parser.format_help().split())  # argparse wraps lines
    assert "Save a checkpoint every N steps (and at the last one). (default: 5000)" in text
    assert "--dataset_split DATASET_SPLIT The split of `--dataset_name` to train on. (default: train)" in text
    assert "(default: None)" not in text and "(default: False)" not in text  # said in words, or nothing to say
    assert "--no_use_repa Turn `--use_repa` off. --repa_encoder" in text  # the off half of a switch: no default
    assert "--logit_mean LOGIT_MEAN Mean of `logit_normal` timestep sampling. (default: 0.0)" in text
    assert "off for LoRA). (default: " not in text  # `--use_repa`, `--use_ema`: the help says it in words
    if script == T2I_SCRIPT:
        assert "--lora_rank LORA_RANK Rank of the LoRA matrices. (default: 32)" in text


# ------------------------------------------------------------------------------------- --image_preprocessing pad


def test_pad_counts_the_images_it_scales_down(tmp_path):
    sizes = [(20, 12), (16, 16), (10, 30), (8, 8)]  # (width, height); larger than 16 on a side: the 1st and 3rd
    rows = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        PIL.Image.fromarray(np.full((size[1], size[0], 3), 200, np.uint8)).save(path)
        rows.append({"image": str(path), "label": i})
    padded = ImageSampleDataset(rows, 16, "pad")
    samples = [padded[i] for i in range(len(rows))]
    assert [s["num_downscaled"] for s in samples] == [1, 0, 1, 0]
    assert samples[2]["pixel_values"].shape == (3, 16, 16)
    assert collate_samples(samples)["num_downscaled"] == 2
    assert "num_downscaled" not in ImageSampleDataset(rows, 16, "resize_center_crop")[0]  # counted for `pad` only


def test_a_pad_run_logs_how_many_images_were_larger(assets, tmp_path, run_main, caplog):
    # The three readable class images are 17 px wide and 20-28 px high; the unreadable one is replaced by the next.
    args = c2i_args(assets, tmp_path / "out", "--max_train_steps", 3, "--no_use_repa", "--image_preprocessing", "pad")
    with caplog.at_level(logging.INFO):
        run_main(C2I_SCRIPT, args)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("--image_preprocessing pad")]
    assert lines == [
        "--image_preprocessing pad: 4 of the 4 images read by the end of epoch 1 were larger than 16x16 and were "
        "scaled down (BICUBIC, aspect ratio kept) to fit before the padding."
    ]


# ---------------------------------------------------------------------------------------------------- model cards


def lora_args(base, output_dir):
    return argparse.Namespace(
        pretrained_model_name_or_path=str(base),
        output_dir=str(output_dir),
        lora_rank=4,
        lora_target_modules="to_q,to_k",
        validation_prompts=['a "red" dress'],
    )


def usage(card: str) -> list[str]:
    return card.split("```py\n", 1)[1].split("```", 1)[0].splitlines()


def test_a_lora_card_loads_the_real_base_and_shows_no_absolute_path(tmp_path, monkeypatch):
    base = tmp_path / "models" / "my-base"
    os.makedirs(base)
    card = lora_model_card(lora_args(base, tmp_path / "runs" / "my-lora"), "")
    assert str(tmp_path) not in card and "path/to" not in card
    shortened = "  # the base pipeline: a local folder (its name; give its path)"
    assert f'pipe = PixNerdT2IPipeline.from_pretrained("my-base"){shortened}' in usage(card)
    assert 'pipe.load_lora_weights("my-lora")  # this folder: a local folder (its name; give its path)' in usage(card)
    assert 'image = pipe("a \\"red\\" dress").images[0]' in usage(card)[-1]  # a valid Python string

    monkeypatch.chdir(tmp_path)  # relative paths are kept as the user typed them
    card = lora_model_card(lora_args("models/my-base", "runs/my-lora"), "")
    relative = "  # the base pipeline: a local folder"
    assert f'pipe = PixNerdT2IPipeline.from_pretrained("models/my-base"){relative}' in usage(card)
    assert "`models/my-base` (a local folder)" in card and "base_model:" not in card

    card = lora_model_card(lora_args("MCG-NJU/PixNerd-XXL-P16-T2I", "runs/my-lora"), "", repo_id="me/my-lora")
    assert 'pipe = PixNerdT2IPipeline.from_pretrained("MCG-NJU/PixNerd-XXL-P16-T2I")' in usage(card)
    assert 'pipe.load_lora_weights("me/my-lora")' in usage(card) and "base_model: MCG-NJU/PixNerd-XXL-P16-T2I" in card


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


# ----------------------------------------------------------------------------------------------------------- docs


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md", "docs/training.md", "docs/results.md"])
def test_the_fashion_mnist_commands_come_with_their_data_prerequisite(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        blocks = f.read().split("```")[1::2]  # the fenced code blocks
    preparing = [block for block in blocks if "fashion_mnist.py prepare" in block]
    assert preparing, f"{page} shows no Fashion-MNIST command"
    for block in preparing:
        assert "apt-get install dataset-fashion-mnist" in block and "/usr/share/datasets/fashion-mnist/" in block
