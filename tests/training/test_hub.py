"""training/hub.py: `--push_to_hub` problems named before training (no token, offline mode, a rejected token, a repo
the token cannot write to), the upload without checkpoints, logs and intermediate samples (the same patterns as the
documented `hf upload`), and the model cards of runs. No network: the Hub calls are monkeypatched or stopped by
offline mode."""

import argparse
import os
import re
import shlex
from types import SimpleNamespace

import pytest

from diffusers_pixnerd.training import HubAccessError, lora_model_card, upload_output_dir
from diffusers_pixnerd.training.hub import check_hub_access, upload_ignore_patterns

from ..helpers import ROOT

pytestmark = pytest.mark.usefixtures("single_thread")


WRITE_TOKEN = {"auth": {"accessToken": {"role": "write"}}}


FINE_GRAINED_ON_ME = {
    "role": "fineGrained",
    "fineGrained": {"scoped": [{"entity": {"type": "user", "name": "me"}, "permissions": ["repo.write"]}]},
}


# ------------------------------------------------------------------------------------------------------- --push_to_hub


def hub_args(tmp_path, **overrides) -> argparse.Namespace:
    return argparse.Namespace(
        **{"hub_model_id": None, "hub_token": None, "output_dir": str(tmp_path / "my-run"), **overrides}
    )


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
        raise HfHubHTTPError(
            "Invalid user token.", response=SimpleNamespace(status_code=401, headers={}, request=None)
        )

    monkeypatch.setattr(huggingface_hub, "whoami", rejected)
    with pytest.raises(HubAccessError, match=f"`--push_to_hub`: the Hub rejected the token from {re.escape(source)}"):
        check_hub_access(hub_args(tmp_path, hub_token=hub_token))


def fake_whoami(info):
    def whoami(token=None):
        return info

    return whoami


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


def test_push_uploads_the_run_without_checkpoints_logs_and_intermediate_samples(tmp_path, monkeypatch):
    import fnmatch
    from argparse import Namespace
    from types import SimpleNamespace

    import huggingface_hub

    from diffusers_pixnerd.training import push_folder

    uploads = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=f"me/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: uploads.update(kw))
    args = Namespace(hub_model_id=None, output_dir=str(tmp_path / "my-run"), hub_token=None, logging_dir="logs")
    assert push_folder(args) == "me/my-run" and uploads["repo_id"] == "me/my-run"

    def ignored(path):
        return any(fnmatch.fnmatch(path, pattern) for pattern in uploads["ignore_patterns"])

    assert ignored("checkpoint-10/model.safetensors") and ignored("logs/pixnerd/events.out")
    assert ignored("validation/step-20/00_cat.png") and ignored("cache/prompt_embeds_0.arrow")
    assert not ignored("validation/final/00_cat.png") and not ignored("transformer/config.json")


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


# --------------------------------------------------------------------------------------------------------- model cards


def test_base_model_is_a_hub_id_never_a_local_path(tmp_path):
    from diffusers_pixnerd.training import hub_model_id

    assert hub_model_id("MCG-NJU/PixNerd-XXL-P16-T2I") == "MCG-NJU/PixNerd-XXL-P16-T2I"
    os.makedirs(tmp_path / "my-pipeline")
    assert hub_model_id(str(tmp_path / "my-pipeline")) is None  # a folder that exists
    assert hub_model_id("./relative/../path") is None and hub_model_id(None) is None


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
