# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""`--dataset_config FILE.toml`: several captioned folders, each with its repeats, caption column and loss masks, and
the regularisation folders, in one file (as kohya's and SimpleTuner's dataset configs); the CLI flags stay for one
folder.

    [[datasets]]                      # one table per folder of training images
    path = "data/blue"                # captions: .txt beside each image, or metadata.jsonl
    repeats = 2                       # each image counts twice per epoch (default 1)
    caption_column = "text"           # the caption key of metadata.jsonl (default: --caption_column)
    mask_dir = "data/blue-masks"      # loss masks: a PNG per image at its relative path (or alpha_mask = true)

    [[regularisation]]                # images the model should keep drawing (see --reg_data_dir)
    path = "data/plain"
"""

import dataclasses
import os

from ..utils import is_integer

FOLDER_KEYS = {"path", "repeats", "caption_column", "mask_dir", "alpha_mask"}
SECTIONS = ("datasets", "regularisation")
# Per-folder settings other trainers have that a run here sets once, with the flag that does.
RUN_WIDE_KEYS = {
    "resolution": "--resolution",
    "aspect_ratio_buckets": "--aspect_ratio_buckets",
    "image_preprocessing": "--image_preprocessing",
}


@dataclasses.dataclass(frozen=True)
class Folder:
    """One `[[datasets]]` or `[[regularisation]]` table of a dataset config."""

    path: str
    repeats: int = 1
    caption_column: str | None = None
    mask_dir: str | None = None
    alpha_mask: bool = False


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    datasets: list[Folder]
    regularisation: list[Folder]


def read_dataset_config(path: str) -> DatasetConfig:
    """The folders of a TOML dataset config; a wrong key, value or path is a `ValueError` naming it and the file.
    Relative paths are relative to the file's folder."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    if not os.path.isfile(path):
        raise ValueError(f"`--dataset_config` {path!r} is not a file.")
    with open(path, "rb") as f:
        try:
            table = tomllib.load(f)
        except tomllib.TOMLDecodeError as error:
            raise ValueError(f"`--dataset_config` {path}: not valid TOML ({error}).") from None
    unknown = sorted(set(table) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"{path}: unknown section {unknown[0]!r}; the sections are [[datasets]] and [[regularisation]]."
        )
    if not table.get("datasets"):
        raise ValueError(f"{path}: no [[datasets]] table (one per folder of training images).")
    base = os.path.dirname(os.path.abspath(path))
    for i, entry in enumerate(table.get("regularisation", [])):
        masked = [key for key in ("mask_dir", "alpha_mask") if isinstance(entry, dict) and key in entry]
        if masked:
            raise ValueError(f"{path} [[regularisation]] #{i + 1}: `{masked[0]}`: regularisation images learn whole.")
    return DatasetConfig(*(
        [read_folder(entry, f"{path} [[{section}]] #{i + 1}", base) for i, entry in enumerate(table.get(section, []))]
        for section in SECTIONS
    ))  # fmt: skip


def read_folder(entry, where: str, base: str) -> Folder:
    """One folder table, checked."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table ([[...]] with keys), got {entry!r}.")
    for key in entry:
        if key in RUN_WIDE_KEYS:
            raise ValueError(f"{where}: `{key}` is set for the whole run here, with {RUN_WIDE_KEYS[key]}.")
        if key not in FOLDER_KEYS:
            raise ValueError(f"{where}: unknown key {key!r}; the keys are {sorted(FOLDER_KEYS)}.")
    if not isinstance(entry.get("path"), str):
        raise ValueError(f"{where}: `path` (the folder, a string) is required.")
    folder = os.path.join(base, entry["path"])
    if not os.path.isdir(folder):
        raise ValueError(f"{where}: `path` {entry['path']!r} is not a folder ({folder}).")
    repeats = entry.get("repeats", 1)
    if not is_integer(repeats) or repeats < 1:
        raise ValueError(f"{where}: `repeats` must be a positive integer, got {repeats!r}.")
    if "caption_column" in entry and not isinstance(entry["caption_column"], str):
        raise ValueError(f"{where}: `caption_column` must be a string, got {entry['caption_column']!r}.")
    mask_dir = entry.get("mask_dir")
    if mask_dir is not None:
        if not isinstance(mask_dir, str) or not os.path.isdir(os.path.join(base, mask_dir)):
            raise ValueError(f"{where}: `mask_dir` {mask_dir!r} is not a folder.")
        mask_dir = os.path.join(base, mask_dir)
    alpha_mask = entry.get("alpha_mask", False)
    if not isinstance(alpha_mask, bool):
        raise ValueError(f"{where}: `alpha_mask` must be true or false, got {alpha_mask!r}.")
    if alpha_mask and mask_dir:
        raise ValueError(f"{where}: give one of `mask_dir` and `alpha_mask`.")
    return Folder(folder, repeats, entry.get("caption_column"), mask_dir, alpha_mask)


def load_folders(folders: list[Folder], caption_column: str = "text"):
    """One captioned dataset of the folders, each `repeats` times, with a `mask` column when any folder has masks
    (a mask file path, "alpha", or "" for none)."""
    import datasets

    from .data import load_training_dataset
    from .images import mask_path

    parts, masked = [], any(f.mask_dir or f.alpha_mask for f in folders)
    for folder in folders:
        try:
            part, _ = load_training_dataset(folder.path, caption_column=folder.caption_column or caption_column)
        except ValueError as error:
            raise ValueError(f"The dataset config's folder {folder.path}: {error}") from None
        if masked:
            if folder.mask_dir:
                masks = [mask_path(value, folder.mask_dir, folder.path) for value in part["image"]]
            else:
                masks = ["alpha" if folder.alpha_mask else ""] * len(part)
            part = part.add_column("mask", masks)
        parts += [part] * folder.repeats
    return datasets.concatenate_datasets(parts)
