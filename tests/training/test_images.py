"""training/images.py: the crops and the padding of the training images, the tensor range, 16-bit, palette and alpha
images converted to RGB."""

import numpy as np
import PIL.Image
import pytest

from diffusers_pixnerd.training import adm_center_crop, image_to_tensor, pad_to_size, resize_center_crop

from ..helpers import random_image

pytestmark = pytest.mark.usefixtures("single_thread")


def test_adm_center_crop_box_halves_then_crops_the_centre():
    # 64 x 64 of 4 x 4 blocks: two BOX halvings make each block one pixel, no resize left to do.
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = PIL.Image.fromarray(np.repeat(np.repeat(blocks, 4, 0), 4, 1)).convert("RGB")
    assert np.array_equal(np.asarray(adm_center_crop(image, 16))[..., 0], blocks)
    # A wide image keeps its centre columns.
    columns = np.tile(np.arange(48, dtype=np.uint8), (16, 1))
    cropped = np.asarray(adm_center_crop(PIL.Image.fromarray(columns).convert("RGB"), 16))[..., 0]
    assert np.array_equal(cropped[0], np.arange(16, 32))


def test_resize_center_crop_follows_torchvision():
    image = PIL.Image.fromarray(random_image(np.random.default_rng(0), 20, 40))  # W 40, H 20
    out = resize_center_crop(image, 10)
    expected = image.resize((20, 10), resample=PIL.Image.BILINEAR).crop((5, 0, 15, 10))
    assert out.size == (10, 10) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_pad_turns_28x28_grayscale_into_centred_32x32_rgb():
    gray = np.full((28, 28), 200, dtype=np.uint8)
    padded = np.asarray(pad_to_size(PIL.Image.fromarray(gray).convert("RGB"), 32))
    assert padded.shape == (32, 32, 3)
    assert (padded[2:30, 2:30] == 200).all() and padded[:2].sum() == 0 and padded[:, 30:].sum() == 0


def test_image_to_tensor_maps_to_minus_one_one():
    tensor = image_to_tensor(PIL.Image.fromarray(np.array([[[0, 255, 127]]], dtype=np.uint8)))
    assert tensor.shape == (3, 1, 1) and tensor.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1])


def test_16_bit_palette_and_alpha_images_convert_to_the_right_rgb(tmp_path):
    import PIL.Image

    from diffusers_pixnerd.training import open_image

    gray16 = np.full((4, 4), 32768, dtype=np.uint16)  # half of the 16-bit range: mid gray, not white
    PIL.Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert PIL.Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert np.asarray(open_image(str(tmp_path / "gray16.png"))).max() == 128

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, but only the left half opaque
    rgba[:, :2, 3] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = np.asarray(open_image(str(tmp_path / "alpha.png")))
    assert rgb[:, :2].tolist() == [[[255, 0, 0]] * 2] * 4 and rgb[:, 2:].max() == 0  # transparent -> black

    palette = PIL.Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert np.asarray(open_image(str(tmp_path / "palette.png"))).tolist() == [[[0, 200, 0]] * 4] * 4
