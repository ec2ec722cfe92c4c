"""training/data.py: class folders, captioned folders and Hub datasets with their errors, unreadable images, class
names, the data loader's workers, `--image_preprocessing pad`, and loss masks read with their images (with whole runs
of both scripts with masks)."""

import argparse
import json
import logging
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_pixnerd.training import (
    ImageSampleDataset,
    collate_samples,
    load_training_dataset,
    read_class_names,
    scan_caption_folder,
    scan_class_folder,
)
from diffusers_pixnerd.training.data import check_masks
from diffusers_pixnerd.training.images import MaskError

from ..helpers import C2I_SCRIPT, T2I_SCRIPT, c2i_args, random_image, rgba_folder, t2i_args

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------------------------- data


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_class_folder_layout_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b_dog", "a_cat"):
        save_png(tmp_path / "data" / name / "0.png", random_image(rng, 8, 8))
    save_png(tmp_path / "data" / "a_cat" / "sub" / "1.png", random_image(rng, 8, 8))
    paths, labels, names = scan_class_folder(str(tmp_path / "data"))
    assert names == ["a_cat", "b_dog"] and labels == [0, 0, 1] and len(paths) == 3
    save_png(tmp_path / "flat" / "0.png", random_image(rng, 8, 8))
    with pytest.raises(ValueError, match="one subfolder per class"):
        scan_class_folder(str(tmp_path / "flat"))
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(ValueError, match="no images"):
        scan_class_folder(str(tmp_path / "empty"))


def test_caption_layouts_and_their_errors(tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "txt" / "a.png", random_image(rng, 8, 8))
    (tmp_path / "txt" / "a.txt").write_text("a cat\n")
    save_png(tmp_path / "txt" / "uncaptioned.png", random_image(rng, 8, 8))
    assert scan_caption_folder(str(tmp_path / "txt")) == ([str(tmp_path / "txt" / "a.png")], ["a cat"])
    save_png(tmp_path / "meta" / "x.png", random_image(rng, 8, 8))
    (tmp_path / "meta" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "caption": "dog"}) + "\n")
    assert scan_caption_folder(str(tmp_path / "meta"), "caption")[1] == ["dog"]
    with pytest.raises(ValueError, match="caption_column"):
        scan_caption_folder(str(tmp_path / "meta"), "text")
    save_png(tmp_path / "none" / "x.png", random_image(rng, 8, 8))
    with pytest.raises(ValueError, match="no captioned images"):
        scan_caption_folder(str(tmp_path / "none"))


def test_metadata_jsonl_errors_name_the_line_and_null_captions_are_the_empty_prompt(tmp_path):
    from diffusers_pixnerd.training import scan_caption_folder

    def write(*lines):
        (tmp_path / "metadata.jsonl").write_text("\n".join(lines))

    write('{"file_name": "a.png", "text": "a cat"}', "", '{"file_name": "b.png", "text": null}')
    paths, captions = scan_caption_folder(str(tmp_path))
    assert captions == ["a cat", ""] and [os.path.basename(p) for p in paths] == ["a.png", "b.png"]
    write('{"file_name": "a.png", "text": "a cat"}', '{"file_name": "b.png", "text": ')
    with pytest.raises(ValueError, match="metadata.jsonl line 2 is not valid JSON"):
        scan_caption_folder(str(tmp_path))
    write('{"file_name": "a.png", "text": 3}')
    with pytest.raises(ValueError, match="line 1: the caption \\('text'\\) must be a string or null, got 3"):
        scan_caption_folder(str(tmp_path))
    write('["a.png", "a cat"]')
    with pytest.raises(ValueError, match="line 1 has the keys list"):
        scan_caption_folder(str(tmp_path))


def test_dataset_columns_are_checked_and_renamed(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    save_png(tmp_path / "0.png", random_image(rng, 8, 8))
    table = datasets.Dataset.from_dict(
        {"img": [str(tmp_path / "0.png")], "cls": [3], "note": ["x"]},
        features=datasets.Features(
            {"img": datasets.Image(), "cls": datasets.Value("int64"), "note": datasets.Value("string")}
        ),
    )
    os.makedirs(tmp_path / "hub")
    table.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    dataset, names = load_training_dataset(dataset_name=str(tmp_path / "hub"), image_column="img", label_column="cls")
    assert dataset.column_names == ["image", "label"] and dataset[0]["label"] == 3 and names is None
    assert isinstance(dataset[0]["image"], dict)  # left undecoded: decoded (or skipped) in the loader workers
    with pytest.raises(ValueError, match=r"`--label_column` 'label' is not a column .*'cls'"):
        load_training_dataset(dataset_name=str(tmp_path / "hub"), image_column="img", label_column="label")
    with pytest.raises(ValueError, match="caption_column"):
        load_training_dataset(dataset_name=str(tmp_path / "hub"), image_column="img", caption_column="text")


def corrupt_folder(tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "c" / "0.png", random_image(rng, 8, 8))
    (tmp_path / "c" / "1.png").write_bytes(b"not a png")
    save_png(tmp_path / "big.png", random_image(rng, 64, 64))
    (tmp_path / "c" / "2.png").write_bytes((tmp_path / "big.png").read_bytes()[:200])  # truncated: header only
    save_png(tmp_path / "c" / "3.png", random_image(rng, 8, 8))
    os.remove(tmp_path / "big.png")
    dataset, _ = load_training_dataset(str(tmp_path), label_column="label")
    return dataset


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    samples = ImageSampleDataset(corrupt_folder(tmp_path), 8, "adm_center_crop")
    items = [samples[i] for i in range(4)]
    assert [item["num_skipped"] for item in items] == [0, 2, 1, 0]  # rows 1 and 2 fall through to row 3
    assert torch.equal(items[1]["pixel_values"], items[3]["pixel_values"])
    batch = collate_samples(items)
    assert batch["num_skipped"] == 3 and batch["pixel_values"].shape == (4, 3, 8, 8)


def test_fail_on_corrupt_images_names_the_file(tmp_path):
    samples = ImageSampleDataset(corrupt_folder(tmp_path), 8, "adm_center_crop", fail_on_corrupt_images=True)
    with pytest.raises(RuntimeError, match="1.png"):
        samples[1]


def test_class_names_from_the_flag(tmp_path):
    assert read_class_names(None, ["a"]) == ["a"]
    assert read_class_names("x, y", None) == ["x", "y"]
    assert len(read_class_names("imagenet", None)) == 1000
    (tmp_path / "names.json").write_text(json.dumps({"0": "zero", "1": "one"}))
    assert read_class_names(str(tmp_path / "names.json"), None) == ["zero", "one"]


# ----------------------------------------------------------------------------------------------------- the data loader


def test_the_data_loader_keeps_its_workers_across_epochs(assets, tmp_path):
    from argparse import Namespace

    from accelerate import Accelerator

    from diffusers_pixnerd.training import create_dataloader, load_training_dataset

    dataset, _ = load_training_dataset(str(assets / "classes"), None, None, "train", "image", label_column="label")
    args = Namespace(
        streaming=False, train_batch_size=1, dataloader_num_workers=1, resolution=16, seed=0,
        image_preprocessing="adm_center_crop", fail_on_corrupt_images=False,
    )  # fmt: skip
    loader = create_dataloader(Accelerator(cpu=True), args, dataset)
    assert loader.num_workers == 1 and loader.persistent_workers


def test_data_loader_workers_are_capped_by_the_cpus(monkeypatch):
    from diffusers_pixnerd.training import data

    monkeypatch.setattr(data, "available_cpus", lambda: 4)
    assert data.dataloader_workers(8, num_processes=1) == 4
    assert data.dataloader_workers(8, num_processes=2) == 2
    assert data.dataloader_workers(1, num_processes=2) == 1
    assert data.dataloader_workers(0) == 0
    with pytest.raises(ValueError, match="`--dataloader_num_workers` must be >= 0"):
        data.dataloader_workers(-1)


# ------------------------------------------------------------------------------------------- --image_preprocessing pad


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


# ---------------------------------------------------------------------------------------------------------- loss masks


@pytest.mark.parametrize("preprocessing", ["adm_center_crop", "resize_center_crop", "pad"])
def test_masks_from_files_or_alpha_follow_their_images_crop(tmp_path, preprocessing):
    root = rgba_folder(tmp_path)
    dataset, _ = load_training_dataset(train_data_dir=os.path.join(root, "images"), caption_column="text")
    from_alpha = ImageSampleDataset(dataset, 16, preprocessing, masks="alpha")
    from_files = ImageSampleDataset(dataset, 16, preprocessing, masks=os.path.join(root, "masks"),
                                    image_root=os.path.join(root, "images"))  # fmt: skip
    for i in range(len(dataset)):
        sample = from_alpha[i]
        a, b = sample["loss_mask"], from_files[i]["loss_mask"]
        assert a.shape == (1, 16, 16) and torch.equal(a, b)
        # The transparent half is composited onto black: bright pixels are the opaque ones, where the mask is 1, also
        # after the crop, resize or padding (the padding is black and masked out).
        bright = sample["pixel_values"][0] > 0
        agree = (bright == (a[0] > 0.5)).float().mean()
        assert agree > 0.95 and 0.2 < a.mean() < 0.8, (agree, a.mean())


def test_a_missing_mask_is_found_before_training_and_never_skipped(tmp_path):
    root = rgba_folder(tmp_path)
    os.remove(os.path.join(root, "masks", "1.png"))
    images = os.path.join(root, "images")
    dataset, _ = load_training_dataset(train_data_dir=images, caption_column="text")
    args = argparse.Namespace(mask_data_dir=os.path.join(root, "masks"), train_data_dir=images)
    with pytest.raises(ValueError, match=r"lacks the masks of 1 of 2 images, e.g. .*masks/1.png"):
        check_masks(args, dataset)
    samples = ImageSampleDataset(dataset, 16, masks=args.mask_data_dir, image_root=images)
    with pytest.raises(MaskError, match=r"No mask for .*1.png: expected .*masks/1.png"):
        samples[1]
    PIL.Image.new("RGB", (8, 8)).save(os.path.join(images, "2.png"))
    (tmp_path / "images" / "2.txt").write_text("no alpha")
    dataset, _ = load_training_dataset(train_data_dir=images, caption_column="text")
    with pytest.raises(MaskError, match=r"2.png has no alpha channel for `--alpha_mask`"):
        [ImageSampleDataset(dataset, 16, masks="alpha")[i] for i in range(len(dataset))]


def test_both_scripts_train_with_masks_flipped_with_their_images(assets, tmp_path, run_main):
    root = rgba_folder(tmp_path / "data", sizes=((16, 16),) * 4)
    shutil.copytree(os.path.join(root, "images"), tmp_path / "classes" / "square")
    shutil.copytree(os.path.join(root, "images"), tmp_path / "classes" / "other")
    extra = ["--max_train_steps", 2, "--no_use_repa", "--random_flip"]
    t2i = t2i_args(assets, "captions_txt", tmp_path / "t2i", "--alpha_mask", *extra)
    t2i[t2i.index("--train_data_dir") + 1] = os.path.join(root, "images")
    run_main(T2I_SCRIPT, t2i)
    assert (tmp_path / "t2i" / "model_index.json").exists()
    c2i = c2i_args(assets, tmp_path / "c2i", "--alpha_mask", *extra)
    c2i[c2i.index("--train_data_dir") + 1] = tmp_path / "classes"
    run_main(C2I_SCRIPT, c2i)
    assert (tmp_path / "c2i" / "model_index.json").exists()
    masks = t2i_args(
        assets, "captions_txt", tmp_path / "files", "--mask_data_dir", os.path.join(root, "masks"), *extra
    )
    masks[masks.index("--train_data_dir") + 1] = os.path.join(root, "images")
    run_main(T2I_SCRIPT, masks)


def test_what_the_mask_hides_is_not_learned(assets, tmp_path, run_main):
    """Black masks everywhere: a zero loss, so the LoRA's B matrices (zero at the start) stay zero; white masks: they
    move."""
    from safetensors.torch import load_file

    root = rgba_folder(tmp_path / "data", sizes=((16, 16),) * 4)
    for value, name in ((0, "black"), (255, "white")):
        os.makedirs(tmp_path / name, exist_ok=True)
        for i in range(4):
            PIL.Image.new("L", (16, 16), value).save(tmp_path / name / f"{i}.png")
        args = t2i_args(assets, "captions_txt", tmp_path / f"lora_{name}", "--mask_data_dir", tmp_path / name,
                        "--use_lora", "--lora_rank", 4, "--learning_rate", 1e-2, "--max_train_steps", 2,
                        "--no_use_repa")  # fmt: skip
        args[args.index("--train_data_dir") + 1] = os.path.join(root, "images")
        run_main(T2I_SCRIPT, args)
        weights = load_file(tmp_path / f"lora_{name}" / "pytorch_lora_weights.safetensors")
        b_norm = sum(float(v.abs().sum()) for k, v in weights.items() if ".lora_B." in k)
        assert (b_norm == 0) if name == "black" else (b_norm > 0), (name, b_norm)
