"""Loss masks (`--mask_data_dir`, `--alpha_mask`): the masked flow-matching loss, masks read from files or the alpha
channel and cropped, resized, padded and flipped with their images, checked before training, and whole runs of both
scripts with masks. Tiny images and models."""

import argparse
import os
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from test_train_scripts import C2I_SCRIPT, T2I_SCRIPT, assets, c2i_args, run_main, t2i_args  # noqa: F401

from diffusers_pixnerd.training import load_training_dataset
from diffusers_pixnerd.training.data import ImageSampleDataset, check_masks
from diffusers_pixnerd.training.images import MaskError
from diffusers_pixnerd.training.objectives import flow_matching_loss, prior_preservation_losses


def test_the_masked_loss_is_each_images_mask_weighted_mean():
    gen = torch.Generator().manual_seed(0)
    output, target = torch.randn(3, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 4, generator=gen)
    sigmas = torch.rand(3, generator=gen)
    ones = torch.ones(3, 1, 4, 4)
    torch.testing.assert_close(
        flow_matching_loss(output, target, sigmas, loss_mask=ones), flow_matching_loss(output, target, sigmas)
    )
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, :, :, :2] = 1  # image 0 learns its left half, image 1 everything, image 2 nothing
    mask[1] = 1
    error = (output - target) ** 2
    expected = (error[0, :, :, :2].mean() + error[1].mean() + 0.0) / 3
    torch.testing.assert_close(flow_matching_loss(output, target, sigmas, loss_mask=mask), expected)
    # Soft masks weight; the regularisation rows after the batch learn whole.
    half = torch.full((3, 1, 4, 4), 0.5)
    torch.testing.assert_close(flow_matching_loss(output, target, sigmas, loss_mask=half), error.mean())
    losses = prior_preservation_losses(output, target, sigmas, reg_samples=1, loss_mask=mask[:2])
    torch.testing.assert_close(losses["fm_loss"], (error[0, :, :, :2].mean() + error[1].mean()) / 2)
    torch.testing.assert_close(losses["reg_loss"], error[2].mean())


def rgba_folder(root, sizes=((24, 16), (16, 24))) -> str:
    """Captioned RGBA images whose left half (in width) is transparent, and their masks as files in `masks/`."""
    os.makedirs(root / "images", exist_ok=True)
    os.makedirs(root / "masks", exist_ok=True)
    for i, (height, width) in enumerate(sizes):
        rgba = np.full((height, width, 4), 200, np.uint8)
        rgba[..., 3] = 255
        rgba[:, : width // 2, 3] = 0
        PIL.Image.fromarray(rgba, "RGBA").save(root / "images" / f"{i}.png")
        (root / "images" / f"{i}.txt").write_text("a square")
        PIL.Image.fromarray(rgba[..., 3]).save(root / "masks" / f"{i}.png")
    return str(root)


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


def test_flips_move_the_mask_with_the_image():
    from diffusers_pixnerd.training.loop import TrainingRun

    run = TrainingRun.__new__(TrainingRun)  # only `step_inputs` and its generator, without a model
    run.args = argparse.Namespace(random_flip=True, timestep_sampling="uniform", shift=1.0, logit_mean=0.0,
                                  logit_std=1.0, mode_scale=1.29, condition_dropout=0.0)  # fmt: skip
    run.generator = lambda: torch.Generator().manual_seed(3)
    pixels = torch.zeros(8, 3, 4, 4)
    pixels[..., :2] = 1  # the left half of each image bright, and its mask on the same half
    mask = torch.zeros(8, 1, 4, 4)
    mask[..., :2] = 1
    inputs = run.step_inputs(pixels, loss_mask=mask)
    flipped = inputs["pixels"][:, 0, 0, -1] == 1
    assert 0 < flipped.sum() < 8  # some flipped, some not
    assert torch.equal(inputs["loss_mask"][:, 0], inputs["pixels"][:, 0])


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
