"""Regularisation images (prior preservation) in `examples/train_pixnerd_t2i.py`: `--reg_data_dir` or images the base
model generates for `--reg_prompts_file` (cached atomically, reused), `--reg_ratio` of each micro-batch, their loss
weighed by `--reg_loss_weight`, drawn in an order fixed by (seed, process, micro-batch) so that a resumed run ends
bit-identical; bad flag combinations named. Tiny models, in-process runs."""

import argparse
import json
import os
import shutil
import sys

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file
from test_train_scripts import ROOT, T2I_SCRIPT, assets, run_main, t2i_args  # noqa: F401

from diffusers_pixnerd.training.objectives import flow_matching_loss, prior_preservation_losses
from diffusers_pixnerd.training.prior import (
    REG_IMAGES_PREFIX,
    RegularisationImages,
    check_prior_arguments,
    generate_reg_images,
    reg_batch_size,
    reg_indices,
)

sys.path.insert(0, os.path.join(ROOT, "examples"))

import train_pixnerd_t2i  # noqa: E402

LORA = ["--use_lora", "--lora_rank", 4, "--learning_rate", 1e-2]
LORA_FILE = "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------------------------ loss and ratio


def test_the_reg_rows_get_their_own_mean_and_weight():
    torch.manual_seed(0)
    output, target, sigmas = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5)
    losses = prior_preservation_losses(output, target, sigmas, "none", reg_samples=2, reg_loss_weight=0.25)
    fm = ((output[:3] - target[:3]) ** 2).mean()
    reg = ((output[3:] - target[3:]) ** 2).mean()
    torch.testing.assert_close(losses["fm_loss"], fm)
    torch.testing.assert_close(losses["reg_loss"], reg)
    torch.testing.assert_close(losses["loss"], fm + 0.25 * reg)
    assert not torch.allclose(losses["loss"], ((output - target) ** 2).mean())  # not the plain mean of all rows


def test_without_reg_rows_the_loss_is_the_plain_flow_matching_loss():
    torch.manual_seed(0)
    output, target, sigmas = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.rand(4)
    losses = prior_preservation_losses(output, target, sigmas, "cosmap")
    assert set(losses) == {"loss", "fm_loss"}
    torch.testing.assert_close(losses["loss"], flow_matching_loss(output, target, sigmas, "cosmap"))


def reg_namespace(tmp_path, **flags):
    defaults = dict(
        reg_data_dir=None,
        reg_prompts_file=None,
        num_reg_images=None,
        reg_ratio=None,
        reg_loss_weight=None,
        train_batch_size=8,
        aspect_ratio_buckets=False,
    )
    return argparse.Namespace(**{**defaults, **flags})


@pytest.mark.parametrize("ratio, expected", [(None, 8), (0.5, 4), (0.25, 2), (2.0, 16), (0.07, 1)])
def test_reg_ratio_sets_the_reg_images_per_micro_batch(tmp_path, ratio, expected):
    args = reg_namespace(tmp_path, reg_data_dir=str(tmp_path), reg_ratio=ratio)
    check_prior_arguments(args)
    assert reg_batch_size(args) == expected
    assert args.reg_loss_weight == 1.0 and args.num_reg_images is None


def test_num_reg_images_defaults_to_100_with_a_prompts_file(tmp_path):
    (tmp_path / "prompts.txt").write_text("a dress\n\na coat\n")
    args = reg_namespace(tmp_path, reg_prompts_file=str(tmp_path / "prompts.txt"), reg_loss_weight=0.5)
    check_prior_arguments(args)
    assert (args.num_reg_images, args.reg_ratio, args.reg_loss_weight) == (100, 1.0, 0.5)


# -------------------------------------------------------------------------------------------------- the order


def test_reg_rows_are_a_function_of_seed_process_and_micro_batch():
    first = [reg_indices(7, 3, seed=0, process_index=0, micro_step=s) for s in range(7)]
    assert first == [reg_indices(7, 3, seed=0, process_index=0, micro_step=s) for s in range(7)]
    stream = [row for rows in first for row in rows]
    # An endless sequence of permutations: every 7 consecutive positions from a multiple of 7 hold each row once.
    for epoch in range(3):
        assert sorted(stream[7 * epoch : 7 * epoch + 7]) == list(range(7))
    assert stream[:7] != stream[7:14]  # a new permutation each pass
    assert first != [reg_indices(7, 3, seed=1, process_index=0, micro_step=s) for s in range(7)]
    assert first != [reg_indices(7, 3, seed=0, process_index=1, micro_step=s) for s in range(7)]
    # Asked for in the middle (a resumed run), a micro-batch gets the same rows as in the uninterrupted sequence.
    assert reg_indices(7, 3, seed=0, process_index=0, micro_step=5) == first[5]


class TinySamples:
    """Stands in for `ImageSampleDataset`: row i is an image filled with i and the caption "reg i"."""

    def __init__(self, n):
        self.dataset = {"caption": [f"reg {i}" for i in range(n)]}

    def __len__(self):
        return len(self.dataset["caption"])

    def __getitem__(self, i):
        return {"pixel_values": torch.full((3, 2, 2), float(i)), "caption": f"reg {i}"}


def test_reg_images_follow_the_batch_with_their_loss_weight():
    reg = RegularisationImages(TinySamples(5), count=2, loss_weight=0.3, seed=0)
    pixels, captions = reg.extend(torch.full((3, 3, 2, 2), -1.0), ["a", "b", "c"], micro_step=4)
    rows = reg_indices(5, 2, 0, 0, 4)
    assert captions == ["a", "b", "c", *(f"reg {r}" for r in rows)]
    assert pixels.shape == (5, 3, 2, 2) and (pixels[:3] == -1).all()
    assert [int(pixels[3 + i, 0, 0, 0]) for i in range(2)] == rows
    assert reg.loss_kwargs == {"reg_samples": 2, "reg_loss_weight": 0.3}


# -------------------------------------------------------------------------------------- generated and cached


class CountingPipeline:
    """Stands in for the base pipeline: records its calls, draws each image from its generator."""

    def __init__(self):
        self.calls = 0

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt_embeds, negative_prompt_embeds, height, width, generator):
        self.calls += 1
        values = [int(torch.randint(0, 256, (), generator=g)) for g in generator]
        return argparse.Namespace(images=[PIL.Image.new("RGB", (width, height), (v, v, v)) for v in values])


class OneProcess:
    device = torch.device("cpu")
    is_main_process = True

    def wait_for_everyone(self):
        pass

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def read_folder(folder):
    rows = [json.loads(line) for line in open(os.path.join(folder, "metadata.jsonl"))]
    return [(row["text"], PIL.Image.open(os.path.join(folder, row["file_name"])).getpixel((0, 0))) for row in rows]


def test_generated_reg_images_are_written_once_and_reused(tmp_path):
    folder = str(tmp_path / f"{REG_IMAGES_PREFIX}abc")
    os.makedirs(folder + ".tmp")  # left by a killed run: its half-written file is never read
    (tmp_path / f"{REG_IMAGES_PREFIX}abc.tmp" / "000000.png.part").write_bytes(b"half")
    pipeline = CountingPipeline()
    encode = lambda prompts: torch.zeros(len(prompts), 2, 4)  # noqa: E731
    generate_reg_images(OneProcess(), pipeline, encode, ["a dress", "a coat"], 5, folder, 8, seed=3, batch_size=2)
    assert pipeline.calls == 3 and not os.path.exists(folder + ".tmp")
    rows = read_folder(folder)
    assert [caption for caption, _ in rows] == ["a dress", "a coat", "a dress", "a coat", "a dress"]
    # Image i is drawn from its own seed: another batch size gives the same images.
    other = CountingPipeline()
    generate_reg_images(OneProcess(), other, encode, ["a dress", "a coat"], 5, str(tmp_path / "b"), 8, 3, batch_size=5)
    assert read_folder(str(tmp_path / "b")) == rows and other.calls == 1
    # Complete: reused without a single pipeline call.
    again = CountingPipeline()
    generate_reg_images(OneProcess(), again, encode, ["a dress", "a coat"], 5, folder, 8, seed=3, batch_size=2)
    assert again.calls == 0 and read_folder(folder) == rows


def test_ctrl_c_while_generating_reg_images_keeps_them_and_the_same_call_continues(tmp_path, caplog):
    encode = lambda prompts: torch.zeros(len(prompts), 2, 4)  # noqa: E731
    prompts = ["a dress", "a coat"]
    reference = str(tmp_path / "reference")
    generate_reg_images(OneProcess(), CountingPipeline(), encode, prompts, 7, reference, 8, seed=3, batch_size=2)

    class StoppedAfterTwoBatches(CountingPipeline):
        def __call__(self, **kwargs):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().__call__(**kwargs)

    folder = str(tmp_path / "folder")
    with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
        generate_reg_images(OneProcess(), StoppedAfterTwoBatches(), encode, prompts, 7, folder, 8, 3, batch_size=2)
    assert sorted(os.listdir(folder + ".tmp")) == [f"{i:06d}.png" for i in range(4)]  # two batches, whole files
    assert "the 4 of 7 made so far are kept" in caplog.text and "run the same command again" in caplog.text
    again = CountingPipeline()
    generate_reg_images(OneProcess(), again, encode, prompts, 7, folder, 8, seed=3, batch_size=2)
    assert again.calls == 2  # only the 3 missing images (two batches)
    assert read_folder(folder) == read_folder(reference)


# ------------------------------------------------------------------------------------------------ whole runs


def reg_run_args(assets, out, *extra):
    return t2i_args(
        assets,
        "captions_txt",
        out,
        *LORA,
        "--max_train_steps",
        4,
        "--checkpointing_steps",
        2,
        "--precompute_text_embeddings",
        "--reg_ratio",
        2,
        "--reg_loss_weight",
        0.5,
        *extra,
    )


def run_and_resume(run_main, args, full, resumed):
    run_main(T2I_SCRIPT, args)
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    for folder in full.glob(f"{REG_IMAGES_PREFIX}*"):  # the generated images travel with the output folder
        shutil.copytree(folder, resumed / folder.name)
    args = list(args)
    args[args.index("--output_dir") + 1] = resumed
    run_main(T2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    return load_file(full / "checkpoint-4" / LORA_FILE), load_file(resumed / "checkpoint-4" / LORA_FILE)


def test_a_resumed_run_with_a_reg_folder_ends_bit_identical(assets, tmp_path, run_main):
    """2 regularisation images per micro-batch from a 4-image folder: checkpoint-2 sits on a pass boundary of the reg
    order; with precomputed embeddings (the reg captions are in the cache)."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = reg_run_args(assets, full, "--reg_data_dir", assets / "captions_jsonl")
    a, b = run_and_resume(run_main, args, full, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (full / "README.md").read_text()  # the card names the regularisation, its folder by name
    assert "| `reg_data_dir` | `captions_jsonl` |" in card and "| `reg_loss_weight` | `0.5` |" in card
    assert "| `reg_ratio` | `2.0` |" in card and "num_reg_images" not in card
    # The regularisation changed the training: the same run without it ends elsewhere.
    plain = tmp_path / "plain"
    steps = ["--max_train_steps", 4, "--checkpointing_steps", 2]
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", plain, *LORA, *steps, "--precompute_text_embeddings"))
    c = load_file(plain / "checkpoint-4" / LORA_FILE)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_a_resumed_run_with_generated_reg_images_reuses_them_and_ends_bit_identical(assets, tmp_path, run_main):
    (tmp_path / "prompts.txt").write_text("a cat\na red square\na tree\n")
    full = tmp_path / "full"
    args = reg_run_args(assets, full, "--reg_prompts_file", tmp_path / "prompts.txt", "--num_reg_images", 5)
    run_main(T2I_SCRIPT, args)
    (folder,) = full.glob(f"{REG_IMAGES_PREFIX}*")
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [row["text"] for row in rows] == ["a cat", "a red square", "a tree", "a cat", "a red square"]
    stamps = {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)}
    # Resumed in the same folder from checkpoint-2: the images are read again, not regenerated.
    shutil.rmtree(full / "checkpoint-4")
    run_main(T2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    assert {name: os.stat(folder / name).st_mtime_ns for name in os.listdir(folder)} == stamps
    assert list(full.glob(f"{REG_IMAGES_PREFIX}*")) == [folder]
    a = load_file(full / "checkpoint-4" / LORA_FILE)
    # ... and an uninterrupted run in a fresh folder ends where the resumed one did.
    fresh = tmp_path / "fresh"
    args[args.index("--output_dir") + 1] = fresh
    run_main(T2I_SCRIPT, args)
    b = load_file(fresh / "checkpoint-4" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- bad flags


def parse(assets, tmp_path, *extra):
    args = t2i_args(assets, "captions_txt", tmp_path / "out", *extra)
    return train_pixnerd_t2i.parse_args([str(a) for a in args])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reg_data_dir", "{data}", "--reg_prompts_file", "{prompts}"], "one of `--reg_data_dir`.*not several"),
        (["--reg_ratio", 0.5], "`--reg_ratio` need regularisation images"),
        (["--reg_loss_weight", 2, "--num_reg_images", 4], "`--num_reg_images`, `--reg_loss_weight` need"),
        (["--reg_data_dir", "{data}", "--num_reg_images", 4], "`--num_reg_images`.*not with `--reg_data_dir`"),
        (["--reg_data_dir", "{data}", "--reg_ratio", 0.4], "rounds to no regularisation image"),
        (["--reg_data_dir", "{data}", "--reg_loss_weight", -1], "`--reg_loss_weight` must be >= 0"),
        (["--reg_data_dir", "{data}", "--aspect_ratio_buckets"], "not with `--aspect_ratio_buckets`"),
        (["--reg_data_dir", "{missing}"], "`--reg_data_dir` .* is not a folder"),
        (["--reg_prompts_file", "{missing}"], "`--reg_prompts_file` .* is not a file"),
        (["--reg_prompts_file", "{empty}"], "has no prompt"),
        (["--reg_prompts_file", "{prompts}", "--num_reg_images", 0], "`--num_reg_images` must be >= 1"),
    ],
)
def test_bad_reg_flags_are_named(assets, tmp_path, flags, message):
    (tmp_path / "prompts.txt").write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    paths = {
        "data": assets / "captions_jsonl",
        "prompts": tmp_path / "prompts.txt",
        "empty": tmp_path / "empty.txt",
        "missing": tmp_path / "nothing",
    }
    flags = [str(f).format(**paths) for f in flags]
    with pytest.raises(ValueError, match=message):
        parse(assets, tmp_path, *flags)


def test_blueness_measures_the_blue_tint():
    import fashion_mnist
    import numpy as np

    gray = np.full((2, 4, 4), 200, np.uint8)
    assert fashion_mnist.blueness(np.repeat(gray[..., None], 3, -1)) == 0.0
    blue = fashion_mnist.tint_blue(gray)
    assert blue[0, 0, 0].tolist() == [40, 40, 200]
    assert fashion_mnist.blueness(blue) == pytest.approx(0.8 * 200 / 255, abs=0.01)
    assert fashion_mnist.blueness(fashion_mnist.tint_red(gray)) == pytest.approx(-0.4 * 200 / 255, abs=0.01)


def garment_images():
    """The web demo's 4 sample garments (Fashion-MNIST test images, 32x32), flipped and turned: 16 grayscale uint8
    images (N, 32, 32)."""
    import glob

    import numpy as np

    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "edit_samples", "*.png")))
    images = np.stack([np.asarray(PIL.Image.open(path).convert("L")) for path in paths])
    return np.ascontiguousarray(
        np.concatenate([images, images[:, ::-1], images[:, :, ::-1], np.rot90(images, 1, (1, 2))])
    )


def test_each_concept_score_measures_its_own_look_and_the_look_can_be_undone():
    import fashion_mnist
    import numpy as np

    images = garment_images()
    plain = np.repeat(images[..., None], 3, -1)
    for name, concept in fashion_mnist.CONCEPTS.items():
        look, score = concept["look"](images), concept["score"]
        with_look = np.array([score(x[None]) for x in look])
        without = np.array([score(x[None]) for x in plain])
        assert with_look.min() > 0.1 and abs(without.mean()) < 0.02, (name, with_look.min(), without.mean())
        assert (without > 0.05 * with_look.mean()).mean() <= 0.1, name  # a plain garment rarely passes the leak bar
        if concept["undo"] is not None:  # the classifier sees the garment as it was (up to the tint's rounding)
            assert np.abs(concept["undo"](look).astype(int) - plain).max() <= 1, name
    assert fashion_mnist.inversion(fashion_mnist.invert(images[:3])) == 1.0
    rng = np.random.default_rng(0)
    assert fashion_mnist.caption(4, rng, ["{}"], "inverted").startswith("an inverted ")


def test_the_backgrounds_of_the_masked_example_lie_outside_the_mask():
    import fashion_mnist
    import numpy as np

    images = garment_images()
    looks = fashion_mnist.tint_blue(images)
    placed = fashion_mnist.on_backgrounds(looks, images, seed=0)
    masks = fashion_mnist.item_masks(images)
    assert np.array_equal(placed[masks], looks[masks])  # the garment as it was
    assert placed[~masks].mean() > 60 and looks[~masks].max() <= 10  # a background where there was black
