# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Official PixNerd repos and folders (a Lightning `.ckpt`, no `model_index.json`): converted once, then cached."""

import dataclasses
import functools
import glob
import os
import re
import shutil
import tempfile
from typing import Any, Callable

import huggingface_hub
from diffusers.utils import logging
from huggingface_hub.errors import OfflineModeIsEnabled

logger = logging.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class OfficialCheckpoint:
    """An official folder or Hub repo's checkpoint: `fetch()` gives its local path (downloading it from the Hub
    once), `folder` is where its converted pipeline is cached (it holds a `model_index.json` once converted)."""

    name: str
    fetch: Callable[[], str]
    folder: str

    @property
    def converted(self) -> bool:
        return os.path.isfile(os.path.join(self.folder, "model_index.json"))


def find_official_checkpoint(
    name_or_path: str,
    checkpoint_name: str | None = None,
    ema: bool = True,
    sample_size: int | None = None,
    cache_dir: str | None = None,
    token: str | None = None,
    revision: str | None = None,
) -> OfficialCheckpoint | None:
    """The official Lightning checkpoint of a folder or Hub repo that holds one and no `model_index.json`; `None` for
    anything else (a diffusers folder or repo, a path, offline and not converted before). Nothing is converted.

    The conversion cache lives in `cache_dir` (default `$HF_HOME/diffusers_pixnerd`), one folder per repo (or folder,
    file size and time), checkpoint, `ema` and `sample_size`; a conversion in it is found without network access.
    """
    root = os.path.join(cache_dir or os.path.join(huggingface_hub.constants.HF_HOME, "diffusers_pixnerd"), "converted")
    tag = f"{'ema' if ema else 'online'}-{sample_size or 'default'}"
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "model_index.json")):
            return None
        checkpoints = sorted(f for f in os.listdir(name_or_path) if f.endswith(".ckpt"))
        key = os.path.abspath(name_or_path).strip(os.sep).replace(os.sep, "--")
        fetch = lambda name: os.path.join(name_or_path, name)  # noqa: E731
        if checkpoints:  # a changed file gets a new conversion
            stat = os.stat(fetch(checkpoint_name or checkpoints[0]))
            tag += f"-{stat.st_size}-{int(stat.st_mtime)}"
    else:
        if re.fullmatch(r"[\w-][\w.-]*/[\w-][\w.-]*", name_or_path) is None:  # not a repo id (e.g. "./folder")
            return None
        if isinstance(
            huggingface_hub.try_to_load_from_cache(name_or_path, "model_index.json", cache_dir, revision), str
        ):
            return None  # a diffusers-format repo already in the cache
        key = name_or_path.replace("/", "--") + (f"@{revision}" if revision else "")
        cached = sorted(glob.glob(os.path.join(root, key, f"{checkpoint_name or '*'}-{tag}", "model_index.json")))
        fetch = lambda name: huggingface_hub.hf_hub_download(name_or_path, name, revision=revision, token=token)  # noqa: E731
        if cached:
            folder = os.path.dirname(cached[0])
            name = os.path.basename(folder)[: -len(tag) - 1]
            return OfficialCheckpoint(name, functools.partial(fetch, name), folder)
        try:
            files = huggingface_hub.HfApi().list_repo_files(name_or_path, revision=revision, token=token)
        except OfflineModeIsEnabled:
            return None  # offline and not converted before: let diffusers say what is missing
        if "model_index.json" in files:
            return None
        checkpoints = sorted(f for f in files if f.endswith(".ckpt"))
    if checkpoint_name is not None:
        if checkpoint_name not in checkpoints:
            raise ValueError(f"`checkpoint_name` {checkpoint_name!r} is not in {name_or_path!r}: {checkpoints}.")
        checkpoints = [checkpoint_name]
    if not checkpoints:
        return None
    if len(checkpoints) > 1:
        logger.warning(
            f"{name_or_path!r} holds {checkpoints}; using {checkpoints[0]!r} (choose with `checkpoint_name`)."
        )
    name = checkpoints[0]
    return OfficialCheckpoint(name, functools.partial(fetch, name), os.path.join(root, key, f"{name}-{tag}"))


def official_pipeline_folder(
    name_or_path: str, convert: Callable[..., Any], ema: bool = True, sample_size: int | None = None, **options
) -> str | None:
    """For a folder or Hub repo that holds an official Lightning checkpoint and no `model_index.json`
    (`find_official_checkpoint`, which takes `options`): the path of its converted pipeline, converted once by
    `convert(checkpoint_path, ema=..., sample_size=...)` (which returns an object with `save_pretrained`, e.g.
    `PixNerdPipeline.from_single_file`) and cached, written atomically. `None` for anything else.
    """
    found = find_official_checkpoint(name_or_path, ema=ema, sample_size=sample_size, **options)
    if found is None:
        return None
    if not found.converted:
        pipe = convert(found.fetch(), ema=ema, sample_size=sample_size)
        os.makedirs(os.path.dirname(found.folder), exist_ok=True)
        staging = tempfile.mkdtemp(dir=os.path.dirname(found.folder), prefix=".converting-")
        try:
            pipe.save_pretrained(staging)
            shutil.rmtree(found.folder, ignore_errors=True)  # an earlier, incomplete conversion
            os.replace(staging, found.folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info(f"Converted {name_or_path!r} ({found.name}) to {found.folder}")
    return found.folder


def check_local_path(
    name_or_path: str | os.PathLike,
    filename: str,
    cache_dir: str | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
    argument: str = "pretrained_model_name_or_path",
) -> None:
    """Raises `FileNotFoundError` saying that a local path does not exist, where the Hub would otherwise answer with
    a repo-id or cache error: for a name that cannot be a repo id (absolute, `./`, `../`, `~`, more than one `/`),
    and, offline, for an `org/name` whose `org` is a folder here and that is not in the Hub cache (`filename`, e.g.
    "model_index.json", is the file looked up there)."""
    path = os.fspath(name_or_path)
    if os.path.exists(os.path.expanduser(path)):
        return
    could_be_repo = re.fullmatch(r"[\w-][\w.-]*(/[\w-][\w.-]*)?", path) is not None
    offline = local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE
    if could_be_repo and not (offline and "/" in path and os.path.isdir(path.split("/")[0])):
        return
    if could_be_repo and isinstance(huggingface_hub.try_to_load_from_cache(path, filename, cache_dir, revision), str):
        return  # a cached Hub repo that shares its org name with a local folder
    hub = ", and offline it is not a Hub repo in the cache either" if could_be_repo else ""
    raise FileNotFoundError(
        f"`{argument}` {path!r}: the local path {os.path.abspath(os.path.expanduser(path))!r} does not exist{hub}."
    )
