"""training/prior.py. Regularisation images (prior preservation) in `examples/train_pixnerd_t2i.py`: `--reg_data_dir`
or images the base model generates for `--reg_prompts_file` (cached atomically, reused), `--reg_ratio` of each
micro-batch, drawn in an order fixed by (seed, process, micro-batch) so that a resumed run ends bit-identical; bad flag
combinations named. Output preservation (`--output_preservation_word`): the caption rewrite, whole runs (exact
resume, the loss changes the result) and bad flags. Their losses are tested with training/objectives.py. Tiny models,
in-process runs."""

import argparse
import json
import os
import shutil
import sys

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd.testing_utils import qwen3_tokenizer
from diffusers_pixnerd.training.prior import (
    REG_IMAGES_PREFIX,
    RegularisationImages,
    caption_without_word,
    captions_in_context,
    check_prior_arguments,
    context_vocabulary,
    generate_reg_images,
    output_preservation_captions,
    random_context_prompts,
    reg_batch_size,
    reg_indices,
)

from ..helpers import ROOT, T2I_SCRIPT, t2i_args

sys.path.insert(0, os.path.join(ROOT, "examples"))
import train_pixnerd_t2i  # noqa: E402

STEPS = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2]


LORA = ["--use_lora", "--lora_rank", 4, "--learning_rate", 1e-2]


LORA_FILE = "pytorch_lora_weights.safetensors"


# ---------------------------------------------------------------------------------------- regularisation images: ratio


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


# ------------------------------------------------------------------------------------ regularisation images: the order


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


# ------------------------------------------------------------------------- regularisation images: generated and cached


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


# ----------------------------------------------------------------------------------- regularisation images: whole runs


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


# ------------------------------------------------------------------------------------ regularisation images: bad flags


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


# ----------------------------------------------------------------------------------- output preservation: the captions


@pytest.mark.parametrize(
    "caption, word, expected",
    [
        ("a blue coat", "blue", "a coat"),
        ("An inverted coat, photo", "inverted", "A coat, photo"),
        ("here is an inverted pair of pants, centered", "inverted", "here is a pair of pants, centered"),
        ("a photo of an checkered umbrella", "checkered", "a photo of an umbrella"),
        ("two Blue coats.", "blue", "two coats."),
        ("blue", "blue", ""),
        ("a bluebird on a coat", "blue", "a bluebird on a coat"),  # whole words only
        ("a sks dog", "sks", "a dog"),
    ],
)
def test_the_caption_loses_the_word_and_keeps_its_grammar(caption, word, expected):
    assert caption_without_word(caption, word) == expected


def test_the_rows_that_hold_the_word_are_marked():
    preserved, rows = output_preservation_captions(["a blue coat", "a coat", "blue shoes"], "blue")
    assert preserved == ["a coat", "a coat", "shoes"] and rows.tolist() == [True, False, True]
    # --output_preservation_reg: the regularisation rows after them, as they are, all preserved.
    preserved, rows = output_preservation_captions(["a blue coat", "a coat"], "blue", ["a dress", "a shoe"])
    assert preserved == ["a coat", "a coat", "a dress", "a shoe"] and rows.tolist() == [True, False, True, True]


def test_the_context_words_are_whole_lowercase_words_without_the_concept_tokens():
    tokenizer = qwen3_tokenizer()
    words = context_vocabulary(tokenizer, "checkered")
    assert len(words) > 10_000 and words == sorted(words)
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 3 for w in words)
    assert "lamp" in words and "check" not in words  # " checkered" is " check" + "ered"
    assert "blue" in words and "blue" not in context_vocabulary(tokenizer, "blue")
    # At the start of a prompt a word splits differently: "insets" is "in" + "sets", and "in" is a piece of
    # "inverted" (at a caption's start); no context word brings in a piece of the concept word, in either place.
    inverted = context_vocabulary(tokenizer, "inverted")
    assert "insets" in words and "insets" not in inverted and "lamp" in inverted
    pieces = {t for form in ("inverted", " inverted", "Inverted", " Inverted") for t in tokenizer.tokenize(form)}
    assert "in" in pieces
    for text in (inverted[:2000], [" " + w for w in inverted[:2000]]):
        assert not pieces.intersection(t for w in text for t in tokenizer.tokenize(w))


def test_random_contexts_put_vocabulary_words_before_the_caption_without_the_word():
    vocabulary = ["lamp", "orbit", "violin", "harbour", "quartz"]
    captions = ["a blue coat", "Here: two blue shoes."]
    prompts = random_context_prompts(captions, "blue", vocabulary, seed=7)
    assert prompts == random_context_prompts(captions, "blue", vocabulary, seed=7)  # a function of the seed
    assert prompts != random_context_prompts(captions, "blue", vocabulary, seed=8)
    for prompt, tail in zip(prompts, ["a coat", "Here: two shoes."]):
        assert prompt.endswith(" " + tail)
        context = prompt[: -len(tail) - 1].split(" ")
        assert 1 <= len(context) <= 4 and set(context) <= set(vocabulary)
    counts = {len(p.split(" ")) - 2 for p in random_context_prompts(["a coat"] * 200, "blue", vocabulary, seed=1)}
    assert counts == {1, 2, 3, 4}


def test_captions_in_context_keep_the_word_behind_zero_to_n_vocabulary_words():
    vocabulary = ["lamp", "orbit", "violin", "harbour", "quartz"]
    captions = ["a blue coat", "Here: two blue shoes."]
    prompts = captions_in_context(captions, vocabulary, seed=7, max_words=3)
    assert prompts == captions_in_context(captions, vocabulary, seed=7, max_words=3)  # a function of the seed
    for prompt, caption in zip(prompts, captions):
        assert prompt.endswith(caption)
        context = prompt[: -len(caption)].split()
        assert len(context) <= 3 and set(context) <= set(vocabulary)
    many = captions_in_context(["a blue coat"] * 200, vocabulary, seed=1, max_words=3)
    assert {len(p.split()) - 3 for p in many} == {0, 1, 2, 3}  # the caption as it is among them
    # Not the draws of text preservation's contexts for the same micro-batch seed.
    other = random_context_prompts(["a blue coat"] * 200, "blue", vocabulary, seed=1)
    assert [p.split()[:-2] for p in many] != [p.split()[:-2] for p in other]


# ------------------------------------------------------------------------------------- output preservation: whole runs


@pytest.mark.parametrize("text", [["--precompute_text_embeddings"], ["--train_text_encoder"]])
def test_a_resumed_run_with_output_preservation_ends_bit_identical_and_differs_from_one_without(
    assets, tmp_path, run_main, text
):
    full, resumed, plain = tmp_path / "full", tmp_path / "resumed", tmp_path / "plain"
    flags = [*LORA, *STEPS, *text]
    args = t2i_args(assets, "captions_txt", full, *flags, "--output_preservation_word", "blue")
    a, b = run_and_resume(run_main, args, full, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (full / "README.md").read_text()
    assert "| `output_preservation_word` | `blue` |" in card and "| `output_preservation_weight` | `1.0` |" in card
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", plain, *flags))
    c = load_file(plain / "checkpoint-4" / LORA_FILE)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the loss changed the training


def test_a_resumed_run_with_text_preservation_ends_bit_identical_and_differs_from_one_without(
    assets, tmp_path, run_main
):
    full, resumed, plain = tmp_path / "full", tmp_path / "resumed", tmp_path / "plain"
    flags = [*LORA, *STEPS, "--train_text_encoder", "--output_preservation_word", "blue"]
    args = t2i_args(assets, "captions_txt", full, *flags, "--text_preservation_weight", 4)
    a, b = run_and_resume(run_main, args, full, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "| `text_preservation_weight` | `4.0` |" in (full / "README.md").read_text()
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", plain, *flags))
    c = load_file(plain / "checkpoint-4" / LORA_FILE)
    changed = [k for k in a if not torch.equal(a[k], c[k])]
    assert changed and any(k.startswith("text_encoder.") for k in changed)


def test_a_resumed_run_with_captions_in_context_ends_bit_identical_and_trains_on_them(
    assets, tmp_path, run_main, monkeypatch
):
    import diffusers_pixnerd.training.prior as prior

    seen = []

    def recorded(captions, vocabulary, seed, max_words):
        prompts = captions_in_context(captions, vocabulary, seed, max_words)
        seen.append((captions, prompts))
        return prompts

    monkeypatch.setattr(prior, "captions_in_context", recorded)
    full, resumed, plain = tmp_path / "full", tmp_path / "resumed", tmp_path / "plain"
    flags = [*LORA, *STEPS, "--output_preservation_word", "blue"]
    args = t2i_args(assets, "captions_txt", full, *flags, "--caption_context_words", 3)
    a, b = run_and_resume(run_main, args, full, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "| `caption_context_words` | `3` |" in (full / "README.md").read_text()
    # Every step's captions, each behind at most 3 words of the vocabulary, some behind at least one.
    assert len(seen) == 4 + 2  # the full run's 4 micro-batches, the resumed run's last 2
    pairs = [pair for captions, prompts in seen for pair in zip(captions, prompts)]
    assert all(p.endswith(c) and len(p[: -len(c)].split()) <= 3 for c, p in pairs)
    assert any(p != c for c, p in pairs)
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", plain, *flags))
    c = load_file(plain / "checkpoint-4" / LORA_FILE)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the captions changed the training


def test_output_preservation_on_the_regularisation_rows_changes_the_run(assets, tmp_path, run_main):
    reg = ["--reg_data_dir", assets / "captions_jsonl", "--reg_ratio", 1, "--precompute_text_embeddings"]
    flags = [*LORA, *STEPS, *reg, "--output_preservation_word", "blue"]
    runs = {}
    for name, extra in (("word_rows", []), ("with_reg", ["--output_preservation_reg"])):
        run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", tmp_path / name, *flags, *extra))
        runs[name] = load_file(tmp_path / name / "checkpoint-4" / LORA_FILE)
    a, b = runs.values()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert "| `output_preservation_reg` | `True` |" in (tmp_path / "with_reg" / "README.md").read_text()


# -------------------------------------------------------------------------------------- output preservation: bad flags


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--output_preservation_weight", 2], "`--output_preservation_weight` needs `--output_preservation_word`"),
        (["--output_preservation_word", "blue"], "needs `--use_lora`"),
        ([*LORA, "--output_preservation_word", " "], "`--output_preservation_word` must be a word"),
        ([*LORA, "--output_preservation_word", "blue", "--output_preservation_weight", -1], "must be >= 0"),
        ([*LORA, "--output_preservation_reg"], "`--output_preservation_reg` needs `--output_preservation_word`"),
        ([*LORA, "--output_preservation_word", "blue", "--output_preservation_reg"], "acts on regularisation images"),
        ([*LORA, "--text_preservation_weight", 1], "`--text_preservation_weight` needs `--output_preservation_word`"),
        ([*LORA, "--caption_context_words", -1], "`--caption_context_words` must be >= 0, got -1"),
        (
            [*LORA, "--caption_context_words", 2, "--precompute_text_embeddings"],
            "`--caption_context_words` changes the captions every step: not with `--precompute_text_embeddings`",
        ),
        (
            [*LORA, "--output_preservation_word", "blue", "--text_preservation_weight", 1],
            "needs `--train_text_encoder`",
        ),
        (
            [*LORA, "--train_text_encoder", "--output_preservation_word", "blue", "--text_preservation_weight", -1],
            "`--text_preservation_weight` must be >= 0",
        ),
    ],
)
def test_bad_output_preservation_flags_are_named(assets, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        parse(assets, tmp_path, *flags)


def test_a_word_in_no_caption_is_named_before_training(assets, tmp_path, run_main):
    args = t2i_args(assets, "captions_txt", tmp_path / "out", *LORA, *STEPS, "--output_preservation_word", "purple")
    with pytest.raises(ValueError, match="`--output_preservation_word` 'purple' is in none of the training captions"):
        run_main(T2I_SCRIPT, args)
    assert not (tmp_path / "out" / "checkpoint-2").exists()
