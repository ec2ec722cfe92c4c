"""Aspect-ratio buckets (`--aspect_ratio_buckets`, training/buckets.py): the bucket table, the assignment of images,
the crop, the seeded batch order and its sharing between processes, the data loader, REPA on non-square text-model
batches, and the training scripts with buckets (an exact resume after SIGKILL, a 2-process run). Tiny images and
models, CPU."""

import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdTransformer2DModel
from diffusers_pixnerd.training import load_training_dataset
from diffusers_pixnerd.training.buckets import (
    AspectRatioBucketSampler,
    BucketBatchStream,
    aspect_ratio_buckets,
    assign_buckets,
    cover_crop,
    create_bucket_dataloader,
    dataset_image_sizes,
    set_loader_epoch,
)
from diffusers_pixnerd.training.objectives import repa_encoder_grid, repa_target_features

from ..helpers import C2I_SCRIPT, ROOT, T2I_SCRIPT, c2i_args, launch, save_image, t2i_args, tiny_dinov2

pytestmark = pytest.mark.usefixtures("single_thread")


# (height, width) of the tiny training images: 4 wide, 4 square, 3 tall; at `--resolution 16` in multiples of 4 the
# buckets are 12x20, 16x16 and 20x12, so a batch of 2 gives 2 + 2 + 1 = 5 batches an epoch (one tall image waits).
WIDE, SQUARE, TALL = [(18, 30), (20, 34), (15, 26), (24, 40)], [(16, 16), (20, 19), (30, 28), (17, 18)], [(30, 18)] * 3


# (height, width) of the tiny training images: 4 wide, 4 square, 3 tall; at `--resolution 16` in multiples of 4 the
# buckets are 12x20, 16x16 and 20x12, so a batch of 2 gives 2 + 2 + 1 = 5 batches an epoch (one tall image waits).
WIDE, SQUARE, TALL = [(18, 30), (20, 34), (15, 26), (24, 40)], [(16, 16), (20, 19), (30, 28), (17, 18)], [(30, 18)] * 3


# (height, width) of the tiny training images: 4 wide, 4 square, 3 tall; at `--resolution 16` in multiples of 4 the
# buckets are 12x20, 16x16 and 20x12, so a batch of 2 gives 2 + 2 + 1 = 5 batches an epoch (one tall image waits).
WIDE, SQUARE, TALL = [(18, 30), (20, 34), (15, 26), (24, 40)], [(16, 16), (20, 19), (30, 28), (17, 18)], [(30, 18)] * 3


# ---------------------------------------------------------------------------------------------------- the bucket table


def test_bucket_table_at_256_and_512():
    # C2I (patch 16) and a T2I model with sample_size 256: multiples of 16.
    assert aspect_ratio_buckets(256, 16) == [
        (192, 336), (208, 304), (224, 288), (240, 272), (256, 256), (272, 240), (288, 224), (304, 208), (336, 192)
    ]  # fmt: skip
    # The official T2I model (sample_size 512, patch 16: a 32 x 32 token grid): multiples of lcm(16, 32) = 32.
    assert aspect_ratio_buckets(512, 32) == [
        (384, 672), (416, 608), (448, 576), (480, 544), (512, 512), (544, 480), (576, 448), (608, 416), (672, 384)
    ]  # fmt: skip
    assert aspect_ratio_buckets(256, 32) == [(192, 320), (224, 288), (256, 256), (288, 224), (320, 192)]
    table = aspect_ratio_buckets(512, 16)
    assert len(table) == 19 and table[0] == (368, 704) and table[-1] == (704, 368) and (512, 512) in table
    for resolution, multiple in ((256, 16), (256, 32), (512, 16), (512, 32)):
        table = aspect_ratio_buckets(resolution, multiple)
        assert table == [(w, h) for h, w in reversed(table)]  # both orientations
        for height, width in table:
            assert height % multiple == 0 and width % multiple == 0
            assert 0.93 * resolution**2 <= height * width <= resolution**2  # never more pixels than the square
            assert 0.5 <= height / width <= 2.0
        ratios = [h / w for h, w in table]
        assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)


@pytest.mark.parametrize("preset,resolution", [("PixNerd-XL/16", 256), ("PixNerd-XXL/16-T2I", 512)])
def test_every_bucket_is_a_size_the_model_takes(preset, resolution):
    with torch.device("meta"):
        model = PixNerdTransformer2DModel.from_preset(preset)
    expected_multiple = 32 if model.is_text_conditional else 16
    assert model.resolution_multiple == expected_multiple
    for height, width in aspect_ratio_buckets(resolution, model.resolution_multiple):
        grid_h, grid_w, patch_h, patch_w = model.token_grid(height, width)
        assert (grid_h * patch_h, grid_w * patch_w) == (height, width)
        # C2I: the token grid follows the image; T2I: it stays 32 x 32, the neural-field patches change shape.
        assert (grid_h, grid_w) == ((32, 32) if model.is_text_conditional else (height // 16, width // 16))


def test_images_go_to_the_bucket_nearest_their_aspect_ratio():
    table = aspect_ratio_buckets(256, 16)
    sizes = [(480, 640), (1080, 1920), (1000, 1000), (1920, 1080), (100, 1000), (1000, 100), (256, 250), (-1, -1)]
    assigned = [table[i] for i in assign_buckets(np.array(sizes), table)]
    # 4:3 landscape -> 9:7 (1.29), 16:9 -> 7:4 (1.75), beyond 2:1 -> the most elongated, unreadable -> square.
    assert assigned == [(224, 288), (192, 336), (256, 256), (336, 192), (192, 336), (336, 192), (256, 256), (256, 256)]


def test_cover_crop_resizes_the_centre_of_the_bucket_shape():
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray((rng.random((40, 80, 3)) * 255).astype(np.uint8))  # 40 high, 80 wide
    square = np.asarray(cover_crop(image, (16, 16)))
    cropped = np.asarray(image.crop((20, 0, 60, 40)).resize((16, 16), resample=PIL.Image.BICUBIC))
    # The centre 40 x 40, resized in one step; only the outer columns differ from crop-then-resize, because the filter
    # also reads the pixels beside the crop instead of repeating its edge.
    assert np.array_equal(square[:, 2:-2], cropped[:, 2:-2]) and not np.array_equal(square, cropped)
    wide = cover_crop(image, (12, 20), PIL.Image.BILINEAR)  # 40 x 66.7 of the source, centred
    expected = image.resize((20, 12), resample=PIL.Image.BILINEAR, box=(6.666666666666668, 0, 73.33333333333333, 40))
    assert wide.size == (20, 12) and np.array_equal(np.asarray(wide), np.asarray(expected))
    assert cover_crop(image, (40, 80)) is image


# --------------------------------------------------------------------------------------------------------- batch order


def test_batches_come_from_one_bucket_and_each_row_at_most_once_an_epoch():
    ids = np.array([0] * 9 + [1] * 5 + [2] * 13)
    sampler = AspectRatioBucketSampler(ids, batch_size=2, num_processes=2)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2 * (2 + 1 + 3)  # per bucket: 9 // 4, 5 // 4, 13 // 4 steps
    assert sampler.dropped_per_epoch() == 1 + 1 + 1
    rows = [i for batch in batches for i in batch]
    assert len(rows) == len(set(rows)) == 24
    for step in range(0, len(batches), 2):  # the two processes' batches of a step share a bucket
        assert len({int(ids[i]) for i in batches[step] + batches[step + 1]}) == 1


def bucket_ids(n=40, buckets=3):
    return np.arange(n) % buckets


def test_the_order_depends_on_seed_and_epoch_only():
    def order(seed, epoch, processes=1):
        sampler = AspectRatioBucketSampler(bucket_ids(), batch_size=2, num_processes=processes, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0, 0) == order(0, 0) and order(3, 5) == order(3, 5)
    assert order(0, 0) != order(1, 0)  # another seed
    assert order(0, 0) != order(0, 1)  # another epoch
    assert sorted(map(sorted, order(0, 0))) != sorted(map(sorted, order(0, 1)))  # other batches, not only reordered
    assert order(0, 0) != order(0, 0, processes=2)  # another batch layout


@pytest.mark.parametrize("num_processes", [1, 2])
def test_accelerate_shares_and_skips_the_bucket_batches(num_processes):
    """Accelerate's `prepare_data_loader` and `skip_first_batches`, as `create_dataloader` and a resumed run use them:
    at step k the processes together train on the sampler's k-th group, each on its own part; a skip resumes at the
    exact step of the epoch set on the sampler."""
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    ids = bucket_ids(40)
    reference = AspectRatioBucketSampler(ids, 2, num_processes, seed=7).groups(epoch=3)
    for skip in (0, 3):
        steps = []
        for rank in range(num_processes):
            sampler = AspectRatioBucketSampler(ids, 2, num_processes, seed=7)
            loader = torch.utils.data.DataLoader(range(40), batch_sampler=sampler)
            loader = prepare_data_loader(
                loader, num_processes=num_processes, process_index=rank, put_on_device=False, use_seedable_sampler=True
            )
            if skip:
                loader = skip_first_batches(loader, skip)
            loader.set_epoch(3)
            sampler.set_epoch(3)  # as `TrainingRun.batches` does
            steps.append([batch.tolist() for batch in loader])
        assert all(len(s) == len(reference) - skip for s in steps)
        for k, group in enumerate(reference[skip:]):
            assert sum((s[k] for s in steps), []) == group.tolist()


# ----------------------------------------------------------------------------------------------------- the data loader


@pytest.fixture(scope="module")
def bucket_data(tmp_path_factory):
    """Class folders (wide / square / tall, one class per shape) and a captioned folder of wide and tall images."""
    root = tmp_path_factory.mktemp("bucket_data")
    for name, sizes in (("a_wide", WIDE), ("b_square", SQUARE), ("c_tall", TALL)):
        for i, (height, width) in enumerate(sizes):
            save_image(root / "classes" / name / f"{i}.png", height, width, seed=100 * len(name) + i)
    rows = []
    for i, (height, width) in enumerate([(18, 30), (20, 34), (30, 18), (34, 20)] * 2):
        save_image(root / "captions" / f"{i}.png", height, width, seed=200 + i)
        rows.append(json.dumps({"file_name": f"{i}.png", "text": ["a wide thing", "a tall thing"][i // 2 % 2]}))
    (root / "captions" / "metadata.jsonl").write_text("\n".join(rows))
    return root


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DataLoaderConfiguration

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def loader_args(tmp_path, **overrides):
    args = dict(
        aspect_ratio_buckets=True,
        resolution=16,
        image_preprocessing="adm_center_crop",
        train_batch_size=2,
        dataloader_num_workers=0,
        fail_on_corrupt_images=False,
        streaming=False,
        seed=0,
        cache_dir=None,
        output_dir=str(tmp_path / "out"),
        shuffle_buffer_size=100,
    )
    return argparse.Namespace(**{**args, **overrides})


def expected_pixels(folder, size):
    """Every image of `folder` cropped to `size` as the data loader makes it, as (3, H, W) tensors in [-1, 1]."""
    tensors = []
    for name in sorted(os.listdir(folder)):
        image = cover_crop(PIL.Image.open(folder / name).convert("RGB"), size)
        tensors.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return tensors


def test_the_data_loader_gives_batches_of_one_bucket_at_its_size(bucket_data, tmp_path, accelerator, caplog):
    dataset, _ = load_training_dataset(bucket_data / "classes", label_column="label")
    args = loader_args(tmp_path)
    with caplog.at_level("INFO"):
        loader = create_bucket_dataloader(accelerator, args, dataset, resolution_multiple=4)
    assert "12x20, 16x16, 20x12" in caplog.text and "Read the sizes of 11 images from their headers" in caplog.text
    size_of_class = {0: (12, 20), 1: (16, 16), 2: (20, 12)}  # wide, square, tall images
    folders = ["a_wide", "b_square", "c_tall"]
    expected = {label: expected_pixels(bucket_data / "classes" / name, size_of_class[label]) for label, name in
                enumerate(folders)}  # fmt: skip
    for epoch in range(2):
        set_loader_epoch(loader, epoch)
        batches = list(loader)
        assert len(loader) == len(batches) == 5
        for batch in batches:
            label = int(batch["label"][0])
            assert batch["label"].tolist() == [label, label]
            assert batch["pixel_values"].shape == (2, 3, *size_of_class[label])
            for pixels in batch["pixel_values"]:  # exactly one of its class's images, cropped to the bucket
                assert sum(torch.equal(pixels, e) for e in expected[label]) == 1
        assert [int(b["label"][0]) for b in batches].count(2) == 1
    # The sizes are cached: the next run reads the cache file instead of the headers.
    cache = [f for f in os.listdir(tmp_path / "out" / "cache") if f.startswith("image_sizes_")]
    assert len(cache) == 1
    caplog.clear()
    with caplog.at_level("INFO"):
        sizes = dataset_image_sizes(dataset, str(tmp_path / "out" / "cache"))
    assert "Image sizes of 11 images from" in caplog.text and "Read the sizes" not in caplog.text
    assert sizes.tolist() == [list(s) for s in WIDE + SQUARE + TALL]


def test_too_few_images_for_a_batch_of_any_bucket_is_an_error(bucket_data, tmp_path, accelerator):
    dataset, _ = load_training_dataset(bucket_data / "classes", label_column="label")
    with pytest.raises(ValueError, match=r"No aspect-ratio bucket holds a full batch: each needs 5 .*largest holds 4"):
        create_bucket_dataloader(accelerator, loader_args(tmp_path, train_batch_size=5), dataset, 4)


def test_pad_preprocessing_is_refused_with_buckets():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_pixnerd_c2i", C2I_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    flags = ["--train_data_dir", "data", "--aspect_ratio_buckets"]
    assert script.parse_args(flags).aspect_ratio_buckets
    with pytest.raises(ValueError, match="`--aspect_ratio_buckets` .*`--image_preprocessing` .* not pad"):
        script.parse_args([*flags, "--image_preprocessing", "pad"])


def test_a_stream_is_batched_per_bucket(bucket_data, tmp_path, accelerator):
    dataset, _ = load_training_dataset(bucket_data / "classes", label_column="label", streaming=True)
    loader = create_bucket_dataloader(accelerator, loader_args(tmp_path, streaming=True), dataset, 4)
    loader.dataset.set_epoch(0)
    batches = list(loader)
    # Each buffer yields a batch as soon as it holds 2 images: 2 wide, 2 square, 1 tall; the last tall one waits.
    assert sorted(tuple(b["pixel_values"].shape[-2:]) for b in batches) == [(12, 20)] * 2 + [(16, 16)] * 2 + [(20, 12)]
    for batch in batches:
        assert len(set(batch["label"].tolist())) == 1

    stream = BucketBatchStream(
        [
            {"pixel_values": torch.zeros(3, h, w), "num_skipped": 0}
            for h, w in [(1, 2), (2, 1), (1, 2), (2, 1), (1, 2)]
        ],
        batch_size=2,
        collate=lambda samples: [tuple(s["pixel_values"].shape) for s in samples],
    )
    assert list(stream) == [[(3, 1, 2)] * 2, [(3, 2, 1)] * 2]


# ---------------------------------------------------------------------------------------------------------------- REPA


def test_repa_on_a_non_square_text_model_batch_sees_the_undistorted_image():
    """The text model keeps a square token grid on a 16 x 32 image: DINOv2 gets the image at 1:2 on a grid of about
    as many patches (3 x 6 for 16 tokens), and its features are resampled to the 4 x 4 token grid."""
    encoder = tiny_dinov2()
    sizes = []
    encoder.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["pixel_values"].shape[-2:]), with_kwargs=True)
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 16, 32) * 2 - 1
    assert repa_encoder_grid((16, 32), (4, 4)) == (3, 6)
    assert repa_encoder_grid((16, 32), (4, 8)) == (4, 8)  # the class-conditional grid follows the image: unchanged
    features = repa_target_features(encoder, pixels, token_grid=(4, 4))
    assert tuple(sizes[0]) == (42, 84) and features.shape == (2, 16, 32)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((pixels + 1) / 2 - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    hidden = encoder(pixel_values=torch.nn.functional.interpolate(x, (42, 84), mode="bicubic")).last_hidden_state
    maps = hidden[:, 1:].transpose(1, 2).reshape(2, 32, 3, 6)
    expected = (
        torch.nn.functional.interpolate(maps, (4, 4), mode="bilinear", antialias=True).flatten(2).transpose(1, 2)
    )
    assert torch.allclose(features, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------ the training scripts


def bucket_c2i_args(assets, bucket_data, output_dir):
    """Tiny C2I with REPA, EMA, flips, a cosine schedule, 2 micro-batches a step, on the wide/square/tall classes."""
    args = c2i_args(
        assets,
        output_dir,
        "--aspect_ratio_buckets",
        "--gradient_accumulation_steps",
        2,
        "--max_train_steps",
        7,
        "--checkpointing_steps",
        2,
        "--random_flip",
        "--ema_decay",
        0.5,
        "--lr_scheduler",
        "cosine",
    )
    args[args.index("--train_data_dir") + 1] = bucket_data / "classes"
    return args


def run_script(args, kill_at_step=None):
    """The C2I script in a subprocess (one process); with `kill_at_step`, it SIGKILLs itself in the first micro-batch
    after that optimizer step (after the checkpoints up to it, in the middle of the next step)."""
    code = (
        "import os, runpy, signal, sys\n"
        "from diffusers_pixnerd.training import loop\n"
        "check_losses = loop.TrainingRun.check_losses\n"
        "def killing_check_losses(self, losses):\n"
        f"    if self.global_step == {kill_at_step}:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return check_losses(self, losses)\n"
        "loop.TrainingRun.check_losses = killing_check_losses\n"
        f"sys.argv = [{C2I_SCRIPT!r}, *sys.argv[1:]]\n"
        f"runpy.run_path({C2I_SCRIPT!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_a_run_killed_mid_epoch_resumes_bit_identical(assets, bucket_data, tmp_path):
    """5 batches an epoch, 2 per optimizer step: steps 1-3 are epoch 0, 4-6 epoch 1, 7 epoch 2. The run is SIGKILLed
    during step 5 (the last checkpoint, checkpoint-4, is one step into epoch 1) and resumed with `latest`: it ends
    bit-identical to the uninterrupted run (a resume in epoch 0 would not show a wrong epoch on the sampler)."""
    full = run_script(bucket_c2i_args(assets, bucket_data, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-4000:]
    killed_dir = tmp_path / "killed"
    killed = run_script(bucket_c2i_args(assets, bucket_data, killed_dir), kill_at_step=4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    assert sorted(f for f in os.listdir(killed_dir) if f.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert json.loads((killed_dir / "checkpoint-4" / "training_state.json").read_text())["steps_per_epoch"] == 3
    resumed = run_script([*bucket_c2i_args(assets, bucket_data, killed_dir), "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "checkpoint-4 (step 4)" in resumed.stderr and "Image sizes of 11 images from" in resumed.stderr
    exported = "transformer/diffusion_pytorch_model.safetensors"
    for path in ("checkpoint-7/model.safetensors", "checkpoint-7/ema.safetensors", exported):
        a, b = load_file(tmp_path / "full" / path), load_file(killed_dir / path)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    # The runs trained with REPA on every bucket and moved the weights.
    start = load_file(tmp_path / "full" / "checkpoint-4" / "model.safetensors")
    final = load_file(tmp_path / "full" / "checkpoint-7" / "model.safetensors")
    assert any(k.startswith("projector.") for k in final) and not all(torch.equal(start[k], final[k]) for k in final)
    assert "`aspect_ratio_buckets` | `True`" in (tmp_path / "full" / "README.md").read_text()


def test_text_to_image_two_processes_with_precomputed_embeddings_and_repa(assets, bucket_data, tmp_path):
    out = tmp_path / "t2i"
    args = t2i_args(
        assets,
        "captions_jsonl",
        out,
        "--aspect_ratio_buckets",
        "--precompute_text_embeddings",
        "--repa_encoder",
        assets / "dinov2",
        "--repa_align_layer",
        1,
        "--max_train_steps",
        3,
        "--checkpointing_steps",
        3,
        "--validation_steps",
        3,
        "--learning_rate",
        1e-3,
    )
    args[args.index("--train_data_dir") + 1] = bucket_data / "captions"
    log = launch(T2I_SCRIPT, args, tmp_path, num_processes=2)
    assert "World size 2: all processes hold identical weights after step 1" in log
    # 4 wide and 4 tall images, 2 processes x 1: 2 steps of each bucket an epoch.
    table = "12x20 (0.60): 4 images, 2 batches, 16x16 (1.00): 0 images, 0 batches, 20x12 (1.67): 4 images, 2 batches"
    assert table in log
    assert "Read the sizes of 8 images from their headers" in log
    # One cache file: the second process read the sizes the main one wrote (same key on both).
    assert len([f for f in os.listdir(out / "cache") if f.startswith("image_sizes_")]) == 1
    assert os.path.exists(out / "model_index.json") and len(os.listdir(out / "validation" / "step-3")) == 1
    assert any(k.startswith("projector.") for k in load_file(out / "checkpoint-3" / "model.safetensors"))


def test_the_size_cache_key_survives_an_added_column_and_follows_the_files(bucket_data):
    """`--precompute_text_embeddings` maps the dataset (a fingerprint that may differ per process and run); the cache
    key reads only the image column's paths and byte lengths."""
    from diffusers_pixnerd.training.buckets import image_column_key

    dataset, _ = load_training_dataset(bucket_data / "captions", caption_column="text")
    mapped = dataset.map(lambda rows: {"extra": [0] * len(rows["caption"])}, batched=True, new_fingerprint="random")
    assert mapped._fingerprint != dataset._fingerprint
    assert image_column_key(mapped) == image_column_key(dataset)
    fewer = dataset.select_columns(["image", "caption"]).filter(lambda row: row["caption"] != "a tall thing")
    assert image_column_key(fewer.flatten_indices()) != image_column_key(dataset)
