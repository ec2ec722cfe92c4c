"""`--dataset_config` (training/dataset_config.py): a TOML file of captioned folders with repeats, caption columns and
loss masks, and regularisation folders; its checks name the key and the file; a tiny run trains from one."""

import json
import os
import sys

import PIL.Image
import pytest

from diffusers_pixnerd.training.dataset_config import load_folders, read_dataset_config

from ..helpers import ROOT, T2I_SCRIPT, rgba_folder, t2i_args

sys.path.insert(0, os.path.join(ROOT, "examples"))


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def folders(tmp_path):
    rgba_folder(tmp_path / "a", sizes=((16, 16),) * 3)  # a/images (captions .txt), a/masks
    os.makedirs(tmp_path / "b")
    rows = []
    for i in range(2):
        PIL.Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(tmp_path / "b" / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "prompt": f"a red thing {i}"}))
    (tmp_path / "b" / "metadata.jsonl").write_text("\n".join(rows))
    return tmp_path


def test_folders_repeats_caption_columns_and_masks(folders):
    config = read_dataset_config(write(folders / "data.toml", """
[[datasets]]
path = "a/images"
repeats = 2
mask_dir = "a/masks"

[[datasets]]
path = "b"
caption_column = "prompt"

[[regularisation]]
path = "b"
caption_column = "prompt"
"""))  # fmt: skip
    assert [f.repeats for f in config.datasets] == [2, 1] and config.datasets[0].path == str(folders / "a" / "images")
    dataset = load_folders(config.datasets)
    assert len(dataset) == 2 * 3 + 2
    assert sorted(set(dataset["caption"])) == ["a red thing 0", "a red thing 1", "a square"]
    masks = dataset["mask"]
    assert masks[:3] == [str(folders / "a" / "masks" / f"{i}.png") for i in range(3)] and masks[-2:] == ["", ""]
    assert [f.path for f in config.regularisation] == [str(folders / "b")]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "[[datasets]]\npath = 'b'\nresolution = 64\n",
            r"#1: `resolution` is set for the whole run here, with --resolution",
        ),
        ("[[datasets]]\npath = 'b'\nrepeat = 2\n", r"#1: unknown key 'repeat'; the keys are"),
        ("[[datasets]]\npath = 'b'\nrepeats = 0\n", r"`repeats` must be a positive integer, got 0"),
        ("[[datasets]]\npath = 'nowhere'\n", r"`path` 'nowhere' is not a folder"),
        ("[[datasets]]\nrepeats = 2\n", r"`path` \(the folder, a string\) is required"),
        ("[[dataset]]\npath = 'b'\n", r"unknown section 'dataset'"),
        ("[[regularisation]]\npath = 'b'\n", r"no \[\[datasets\]\] table"),
        (
            "[[datasets]]\npath = 'b'\n[[regularisation]]\npath = 'b'\nalpha_mask = true\n",
            r"regularisation images learn whole",
        ),
        ("[[datasets]]\npath = 'b\n", r"not valid TOML"),
        ("[[datasets]]\npath = 'b'\nalpha_mask = 'yes'\n", r"`alpha_mask` must be true or false"),
    ],
)
def test_a_bad_config_names_the_key_and_the_file(folders, text, message):
    path = write(folders / "bad.toml", text)
    with pytest.raises(ValueError, match=message) as error:
        read_dataset_config(path)
    assert "bad.toml" in str(error.value)


def test_a_run_trains_from_a_dataset_config(assets, folders, run_main):
    config = write(folders / "data.toml", f"""
[[datasets]]
path = "{folders / 'a' / 'images'}"
mask_dir = "{folders / 'a' / 'masks'}"
repeats = 2

[[datasets]]
path = "b"
caption_column = "prompt"

[[regularisation]]
path = "b"
caption_column = "prompt"
""")  # fmt: skip
    args = t2i_args(assets, "captions_txt", folders / "out", "--max_train_steps", 2, "--no_use_repa", "--reg_ratio", 1)
    i = args.index("--train_data_dir")
    args[i : i + 2] = ["--dataset_config", config]
    run_main(T2I_SCRIPT, args)
    card = (folders / "out" / "README.md").read_text()
    assert "dataset_config" in card and "reg_ratio" in card
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import train_pixnerd_t2i

    with pytest.raises(ValueError, match=r"`--dataset_config` holds the data: not with `--train_data_dir`"):
        train_pixnerd_t2i.parse_args([str(a) for a in [*args, "--train_data_dir", folders / "b"]])
