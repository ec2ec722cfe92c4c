# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Regularisation images (prior preservation, DreamBooth's `--with_prior_preservation`): captioned images of what the
model should keep drawing, mixed into every micro-batch with their own loss weight, so that a concept taught by a small
fine-tune ("a blue dress") stays tied to its word instead of leaking into every prompt ("a dress").

The images come from a second captioned folder (`--reg_data_dir`) or are generated once by the base model for the
prompts of `--reg_prompts_file` (`generate_reg_images`, cached atomically in the output folder and reused on resume).
Each micro-batch gets `round(--reg_ratio x --train_batch_size)` of them after its own images; which ones is a function
of (seed, process, micro-batch number) only (`reg_indices`), so a resumed run reads exactly the same ones.

Output preservation (`--output_preservation_word`, ai-toolkit's "differential output preservation") works on the
training images themselves: each caption without the concept word (`caption_without_word`) must give, on the same noisy
image, what the base model (the adapters switched off) gives; its loss is added with `--output_preservation_weight`
(`PixNerdTrainingModule.output_preservation_loss`). Text preservation (`--text_preservation_weight`, with a
text-encoder LoRA) holds the encoder's own output to the base encoder's on the batch's captions without the word behind
a few random words of the tokenizer's vocabulary (`random_context_prompts`): the word's adapters must not turn other,
never-seen words of a prompt into the concept.
"""

import argparse
import hashlib
import json
import logging
import os
import re

import torch

from .validation import read_prompts_file

logger = logging.getLogger(__name__)

REG_IMAGES_PREFIX = "reg_images-"  # generated regularisation images: `--output_dir/reg_images-<digest>/`
REG_FLAGS = ("--reg_data_dir", "--reg_prompts_file")


def add_prior_arguments(parser: argparse.ArgumentParser):
    """The regularisation flags (a group of their own)."""
    group = parser.add_argument_group("regularisation (prior preservation)")
    group.add_argument(
        "--reg_data_dir",
        type=str,
        default=None,
        help="A captioned folder (same layouts as --train_data_dir) of what the model should keep drawing, e.g. "
        "untinted images captioned without the new word.",
    )
    group.add_argument(
        "--reg_prompts_file",
        type=str,
        default=None,
        help="Instead: a text file of prompts (one a line) for which the base model generates the regularisation "
        "images once, before training (cached in --output_dir, reused on resume).",
    )
    group.add_argument(
        "--num_reg_images",
        type=int,
        default=None,
        help="With --reg_prompts_file: how many images to generate, cycling through the prompts (default 100).",
    )
    group.add_argument(
        "--reg_ratio",
        type=float,
        default=None,
        help="Regularisation images per training image in each micro-batch (default 1.0: as many as "
        "--train_batch_size, like diffusers' prior preservation); round(ratio x batch) must be >= 1.",
    )
    group.add_argument(
        "--reg_loss_weight",
        type=float,
        default=None,
        help="Weight of the regularisation images' loss: loss = fm_loss + weight x reg_loss (default 1.0).",
    )
    group.add_argument(
        "--output_preservation_word",
        type=str,
        default=None,
        help="LoRA only: the concept's word (e.g. blue). Each training caption without it ('a blue dress' -> 'a "
        "dress') must give, on the same noisy image, what the base model gives (the adapters switched off): the word "
        "carries the concept, the prompts without it stay the base's.",
    )
    group.add_argument(
        "--output_preservation_weight",
        type=float,
        default=None,
        help="With --output_preservation_word: the weight of that loss (default 1.0).",
    )
    group.add_argument(
        "--output_preservation_reg",
        action="store_true",
        help="With --output_preservation_word and regularisation images: hold their rows (captions without the word) "
        "to the base model's output too, beside their own flow-matching loss.",
    )
    group.add_argument(
        "--caption_context_words",
        type=int,
        default=0,
        help="Put each training caption (not the regularisation images' ones) behind 0 to N random whole words of the "
        "tokenizer's vocabulary, drawn anew every step (the same on resume): the concept's word is then learnt "
        "after many different words, not only after those of your captions (default: 0, off).",
    )
    group.add_argument(
        "--text_preservation_weight",
        type=float,
        default=None,
        help="With --output_preservation_word and --train_text_encoder: the weight of a loss that holds the text "
        "encoder's output (relative squared error) to the base encoder's on the batch's captions without the word, "
        "each behind 1-4 random words of the tokenizer's vocabulary, so that the word's adapters leave the other "
        "words of a prompt as they were (default: off).",
    )


def check_prior_arguments(args: argparse.Namespace):
    """Fills the defaults of a regularised run and refuses what it does not support, naming the flags."""
    context_words = getattr(args, "caption_context_words", 0)
    if context_words < 0:
        raise ValueError(f"`--caption_context_words` must be >= 0, got {context_words}.")
    if context_words and getattr(args, "precompute_text_embeddings", False):
        raise ValueError(
            "`--caption_context_words` changes the captions every step: not with `--precompute_text_embeddings`."
        )
    reg_data_dir, reg_prompts_file = getattr(args, "reg_data_dir", None), getattr(args, "reg_prompts_file", None)
    reg_folders = getattr(args, "reg_folders", None)  # a dataset config's [[regularisation]] folders
    if sum(source is not None for source in (reg_data_dir, reg_prompts_file, reg_folders)) > 1:
        raise ValueError(
            "Pass one of `--reg_data_dir` (images), `--reg_prompts_file` (generated images) and a dataset config's "
            "[[regularisation]] folders, not several."
        )
    if reg_folders is not None:
        reg_data_dir = reg_folders[0].path  # checked by the config reader; the same rules as a folder
    if reg_data_dir is None and reg_prompts_file is None:
        given = [f"--{name}" for name in ("num_reg_images", "reg_ratio", "reg_loss_weight") if getattr(args, name)]
        if given:
            raise ValueError(
                f"{', '.join(f'`{g}`' for g in given)} need regularisation images: pass `--reg_data_dir` or "
                "`--reg_prompts_file`."
            )
        return
    if reg_data_dir is not None and args.num_reg_images is not None:
        raise ValueError(
            "`--num_reg_images` sets how many images `--reg_prompts_file` generates: not with `--reg_data_dir`."
        )
    if reg_data_dir is not None and not os.path.isdir(reg_data_dir):
        raise ValueError(f"`--reg_data_dir` {reg_data_dir!r} is not a folder.")
    if reg_prompts_file is not None:
        read_reg_prompts(reg_prompts_file)  # fails early on a missing or empty file
        args.num_reg_images = 100 if args.num_reg_images is None else args.num_reg_images
        if args.num_reg_images < 1:
            raise ValueError(f"`--num_reg_images` must be >= 1, got {args.num_reg_images}.")
    args.reg_ratio = 1.0 if args.reg_ratio is None else args.reg_ratio
    args.reg_loss_weight = 1.0 if args.reg_loss_weight is None else args.reg_loss_weight
    if reg_batch_size(args) < 1:
        raise ValueError(
            f"`--reg_ratio` {args.reg_ratio} x `--train_batch_size` {args.train_batch_size} rounds to no "
            "regularisation image per micro-batch: raise `--reg_ratio`."
        )
    if args.reg_loss_weight < 0:
        raise ValueError(f"`--reg_loss_weight` must be >= 0, got {args.reg_loss_weight}.")
    if getattr(args, "aspect_ratio_buckets", False):
        raise ValueError(
            "`--reg_data_dir`/`--reg_prompts_file` mix square `--resolution` images into each batch: not with "
            "`--aspect_ratio_buckets` (batches of other sizes). Train the concept on square images instead: leave "
            "`--aspect_ratio_buckets` out, and `--image_preprocessing pad` keeps non-square images whole (padded), "
            "`resize_center_crop` crops them."
        )


def check_output_preservation_arguments(args: argparse.Namespace):
    """Fills the default weight of `--output_preservation_word` and refuses what it cannot work with."""
    word, weight = getattr(args, "output_preservation_word", None), getattr(args, "output_preservation_weight", None)
    if word is None:
        given = [
            f"`--{name}`"
            for name in ("output_preservation_weight", "output_preservation_reg", "text_preservation_weight")
            if getattr(args, name, None)
        ]
        if given:
            verb = "needs" if len(given) == 1 else "need"
            raise ValueError(f"{' and '.join(given)} {verb} `--output_preservation_word` (the concept's word).")
        return
    if getattr(args, "output_preservation_reg", False) and not (
        getattr(args, "reg_data_dir", None)
        or getattr(args, "reg_prompts_file", None)
        or getattr(args, "reg_folders", None)
    ):
        raise ValueError(
            "`--output_preservation_reg` acts on regularisation images: pass `--reg_data_dir` or `--reg_prompts_file`."
        )
    if not word.strip():
        raise ValueError("`--output_preservation_word` must be a word of the captions, got an empty string.")
    if not args.use_lora:
        raise ValueError(
            "`--output_preservation_word` compares with the base model by switching the adapters off: it needs "
            "`--use_lora`."
        )
    if getattr(args, "distill", False):
        raise ValueError("`--output_preservation_word` teaches a concept: not with `--distill`.")
    args.output_preservation_weight = 1.0 if weight is None else weight
    if args.output_preservation_weight < 0:
        raise ValueError(f"`--output_preservation_weight` must be >= 0, got {args.output_preservation_weight}.")
    text_weight = getattr(args, "text_preservation_weight", None)
    if text_weight is not None:
        if text_weight < 0:
            raise ValueError(f"`--text_preservation_weight` must be >= 0, got {text_weight}.")
        if not getattr(args, "train_text_encoder", False):
            raise ValueError(
                "`--text_preservation_weight` holds the text encoder's adapters to the base encoder: it needs "
                "`--train_text_encoder`."
            )


def caption_without_word(caption: str, word: str) -> str:
    """`caption` with each whole occurrence of `word` (any case) taken out, the article before it agreeing with the
    next word ("an inverted coat" -> "a coat") and the spaces tidied; unchanged when it does not hold the word."""
    pattern = re.compile(rf"\b(?:(an?)\s+)?{re.escape(word.strip())}\b\s*", re.IGNORECASE)

    def replace(match: re.Match) -> str:
        article = match.group(1)
        if article is None:
            return ""
        following = caption[match.end() :]
        return (article[0] + "n" if following[:1].lower() in tuple("aeiou") else article[0]) + " "

    text = pattern.sub(replace, caption)
    return re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s{2,}", " ", text)).strip()


def context_vocabulary(tokenizer, word: str) -> list[str]:
    """The words random contexts are drawn from: the vocabulary's tokens that are a space and 3 or more lowercase
    ASCII letters (" cat", not sub-words or other scripts), sorted (the same list on every process). None of them
    holds a token of `word` (alone, after a space, capitalised), after a space or at the start of a prompt, where a
    word splits differently ("insets" is "in" + "sets", and "in" is a piece of "inverted")."""
    word = word.strip()
    forms = {f for w in (word, word.capitalize()) for f in (w, " " + w)} if word else set()
    excluded = {token for form in forms for token in tokenizer.tokenize(form)}
    candidates = set()
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        if len(text) >= 4 and text[0] == " " and text[1:].isascii() and text[1:].isalpha() and text[1:].islower():
            candidates.add(text[1:])
    candidates = sorted(candidates)
    if not excluded:
        return candidates
    spaced = tokenizer([" " + c for c in candidates], add_special_tokens=False)["input_ids"]
    alone = tokenizer(candidates, add_special_tokens=False)["input_ids"]
    excluded_ids = set(tokenizer.convert_tokens_to_ids(sorted(excluded)))
    return [c for c, a, b in zip(candidates, spaced, alone) if not excluded_ids.intersection(a + b)]


def behind_random_words(
    captions: list[str], vocabulary: list[str], generator: torch.Generator, min_words: int, max_words: int
) -> list[str]:
    """Each caption behind `min_words` to `max_words` words drawn from `vocabulary` ("a dress" -> "lamp orbit a
    dress")."""
    prompts = []
    for caption in captions:
        count = int(torch.randint(min_words, max_words + 1, (), generator=generator))
        picks = torch.randint(len(vocabulary), (count,), generator=generator).tolist()
        prompts.append(" ".join([*(vocabulary[i] for i in picks), caption]))
    return prompts


def random_context_prompts(
    captions: list[str], word: str, vocabulary: list[str], seed: int, max_words: int = 4
) -> list[str]:
    """Each caption without `word`, behind 1 to `max_words` words drawn from `vocabulary` ("a blue dress" -> "lamp
    orbit a dress"): prompts that hold the base's words and words no caption has. `seed` is the micro-batch's
    (`TrainingRun.generator().initial_seed()`, so a resumed run draws the same words), mixed with a constant of its
    own so that the draws are not those of the step's noise."""
    generator = torch.Generator().manual_seed(seed ^ 0x5EED_7E47)
    return behind_random_words([caption_without_word(c, word) for c in captions], vocabulary, generator, 1, max_words)


def captions_in_context(captions: list[str], vocabulary: list[str], seed: int, max_words: int) -> list[str]:
    """`--caption_context_words`: each training caption, its word kept, behind 0 to `max_words` words drawn from
    `vocabulary` ("a blue dress" -> "orbit a blue dress"), so that the concept's word is learnt after words no caption
    has. `seed` is the micro-batch's, as for `random_context_prompts`, with a constant of its own."""
    generator = torch.Generator().manual_seed(seed ^ 0xC0_47E7)
    return behind_random_words(captions, vocabulary, generator, 0, max_words)


def output_preservation_captions(
    captions: list[str], word: str, reg_captions: list[str] = ()
) -> tuple[list[str], torch.Tensor]:
    """The captions without `word` and which rows held it (a bool tensor): the rows whose output is preserved; then
    the `reg_captions` as they are, every one preserved (`--output_preservation_reg`)."""
    preserved = [caption_without_word(caption, word) for caption in captions]
    rows = [p != c for p, c in zip(preserved, captions)] + [True] * len(reg_captions)
    return preserved + list(reg_captions), torch.tensor(rows, dtype=torch.bool)


def reg_batch_size(args: argparse.Namespace) -> int:
    """Regularisation images per micro-batch: `round(--reg_ratio x --train_batch_size)`."""
    return round(args.reg_ratio * args.train_batch_size)


def read_reg_prompts(path: str) -> list[str]:
    """The non-empty lines of `--reg_prompts_file`."""
    return read_prompts_file(path, "--reg_prompts_file")


def reg_indices(num_rows: int, count: int, seed: int, process_index: int, micro_step: int) -> list[int]:
    """The rows of micro-batch `micro_step`: the `count` next ones of an endless sequence of permutations of the
    `num_rows` rows, permutation `e` seeded by (seed, process, e). A function of its arguments only, so a resumed run
    (which knows its micro-batch number) reads the same rows as an uninterrupted one."""
    rows, permutations = [], {}
    for position in range(micro_step * count, (micro_step + 1) * count):
        epoch, row = divmod(position, num_rows)
        if epoch not in permutations:
            key = ((seed * 1_000_003 + process_index) * 1_000_003 + epoch) % 2**63
            permutations[epoch] = torch.randperm(num_rows, generator=torch.Generator().manual_seed(key))
        rows.append(int(permutations[epoch][row]))
    return rows


class RegularisationImages:
    r"""
    The regularisation images of a run and the part of each micro-batch they make up.

    Args:
        samples (`ImageSampleDataset`): the decoded, preprocessed images with their `caption`.
        count (`int`): images per micro-batch (`reg_batch_size`).
        loss_weight (`float`): the weight of their loss (`--reg_loss_weight`).
        seed (`int`), process_index (`int`): with the micro-batch number, what picks the rows (`reg_indices`).
    """

    def __init__(self, samples, count: int, loss_weight: float, seed: int, process_index: int = 0):
        self.samples, self.count, self.loss_weight = samples, count, loss_weight
        self.seed, self.process_index = seed, process_index

    @property
    def captions(self) -> list[str]:
        return list(self.samples.dataset["caption"])

    def batch(self, micro_step: int) -> dict:
        """The regularisation rows of micro-batch `micro_step`, decoded in this process (a few small images)."""
        from .data import collate_samples

        rows = reg_indices(len(self.samples), self.count, self.seed, self.process_index, micro_step)
        return collate_samples([self.samples[row] for row in rows])

    def extend(self, pixels: torch.Tensor, captions: list[str], micro_step: int) -> tuple[torch.Tensor, list[str]]:
        """The micro-batch's images and captions with the regularisation ones after them."""
        reg = self.batch(micro_step)
        reg_pixels = reg["pixel_values"].to(pixels.device, pixels.dtype)
        return torch.cat([pixels, reg_pixels]), list(captions) + list(reg["caption"])

    @property
    def loss_kwargs(self) -> dict:
        """What `PixNerdTrainingModule.forward` needs to weigh the last `count` rows as regularisation."""
        return {"reg_samples": self.count, "reg_loss_weight": self.loss_weight}


def load_regularisation_images(
    accelerator, args: argparse.Namespace, folder: str, caption_column: str = "text", dataset=None
) -> RegularisationImages:
    """The `RegularisationImages` of a captioned `folder` (or of `dataset`, described as `folder`), preprocessed like
    the training images."""
    from .data import ImageSampleDataset, load_training_dataset

    if dataset is None:
        try:
            dataset, _ = load_training_dataset(folder, caption_column=caption_column)
        except ValueError as error:
            raise ValueError(f"The regularisation images ({folder}): {error}") from None
    samples = ImageSampleDataset(dataset, args.resolution, args.image_preprocessing, args.fail_on_corrupt_images)
    count = reg_batch_size(args)
    logger.info(
        "Regularisation: %d images from %s, %d per micro-batch after the %d training ones, loss weight %g",
        len(samples),
        folder,
        count,
        args.train_batch_size,
        args.reg_loss_weight,
    )
    return RegularisationImages(samples, count, args.reg_loss_weight, args.seed, accelerator.process_index)


# ----------------------------------------------------------------------------------------- generated by the base model


def reg_images_folder(output_dir: str, key) -> str:
    """`output_dir/reg_images-<digest>`: the digest covers what the images depend on (`key`: the base model, the
    prompts, their number, the size, the seed, the sampler), so changed settings never reuse stale images."""
    digest = hashlib.sha256(json.dumps(key, default=str, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(output_dir, f"{REG_IMAGES_PREFIX}{digest}")


def generate_reg_images(
    accelerator,
    pipeline,
    encode,
    prompts: list[str],
    num_images: int,
    folder: str,
    resolution: int,
    seed: int,
    batch_size: int = 16,
) -> str:
    """Generates `num_images` images with the base `pipeline` for the `prompts` (image `i` for prompt `i % len`, its
    noise seeded by (seed, i)) into the captioned `folder` (PNGs + `metadata.jsonl`), on the main process with a
    progress bar. The images are made in `folder.tmp`, each written atomically, and the folder is renamed when
    complete: a run stopped on the way (Ctrl-C, a kill) keeps the images made so far, and the same command continues
    from there; a complete folder is reused. `encode` turns prompts into embeddings (the run's frozen text encoder).
    Returns `folder`."""
    from tqdm.auto import tqdm

    if accelerator.is_main_process and not os.path.isdir(folder):
        temporary = folder + ".tmp"  # kept across runs: the images made so far
        os.makedirs(temporary, exist_ok=True)
        captions = [prompts[i % len(prompts)] for i in range(num_images)]
        names = [f"{i:06d}.png" for i in range(num_images)]
        missing = [i for i in range(num_images) if not os.path.isfile(os.path.join(temporary, names[i]))]
        logger.info(
            "Generating %d regularisation images with the base model into %s (%d made earlier)",
            num_images,
            folder,
            num_images - len(missing),
        )
        device = accelerator.device
        pipeline.set_progress_bar_config(disable=True)
        null = encode([""])
        progress = tqdm(total=num_images, initial=num_images - len(missing), desc="Regularisation images")
        try:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                generators = [torch.Generator(device).manual_seed(seed * 1_000_003 + i) for i in chunk]
                with torch.no_grad(), accelerator.autocast():
                    images = pipeline(
                        prompt_embeds=encode([captions[i] for i in chunk]),
                        negative_prompt_embeds=null.expand(len(chunk), -1, -1),
                        height=resolution,
                        width=resolution,
                        generator=generators,
                    ).images
                for i, image in zip(chunk, images):
                    path = os.path.join(temporary, names[i])
                    image.save(path + ".part", format="PNG")
                    os.replace(path + ".part", path)
                progress.update(len(chunk))
        except KeyboardInterrupt:
            made = sum(os.path.isfile(os.path.join(temporary, n)) for n in names)
            logger.warning(
                "Stopped while generating the regularisation images: the %d of %d made so far are kept in %s; run "
                "the same command again to continue from there.",
                made,
                num_images,
                temporary,
            )
            raise
        finally:
            progress.close()
        with open(os.path.join(temporary, "metadata.jsonl"), "w", encoding="utf-8") as metadata:
            metadata.writelines(json.dumps({"file_name": n, "text": c}) + "\n" for n, c in zip(names, captions))
        os.replace(temporary, folder)
    elif accelerator.is_main_process:
        logger.info("Reusing the regularisation images in %s", folder)
    accelerator.wait_for_everyone()
    return folder


def prepare_regularisation_images(accelerator, args: argparse.Namespace, transformer, scheduler, encode):
    """The run's `RegularisationImages` (`None` without `--reg_data_dir`/`--reg_prompts_file`): the folder's, or
    those the base `transformer` generates for `--reg_prompts_file` (before any adapter is added) with `scheduler` and
    the run's `encode`."""
    if getattr(args, "reg_folders", None):
        from .dataset_config import load_folders

        dataset = load_folders(args.reg_folders, args.caption_column)
        folders = ", ".join(f.path for f in args.reg_folders)
        return load_regularisation_images(accelerator, args, folders, dataset=dataset)
    if args.reg_data_dir is not None:
        return load_regularisation_images(accelerator, args, args.reg_data_dir, args.caption_column)
    if args.reg_prompts_file is None:
        return None
    from ..pipelines import PixNerdT2IPipeline

    prompts = read_reg_prompts(args.reg_prompts_file)
    key = [
        args.pretrained_model_name_or_path,
        prompts,
        args.num_reg_images,
        args.resolution,
        args.seed,
        dict(scheduler.config),
    ]
    folder = reg_images_folder(args.output_dir, key)
    transformer.to(accelerator.device).eval()
    pipeline = PixNerdT2IPipeline(transformer, scheduler)
    generate_reg_images(
        accelerator, pipeline, encode, prompts, args.num_reg_images, folder, args.resolution, args.seed
    )
    transformer.train()
    return load_regularisation_images(accelerator, args, folder)
