"""Does a concept LoRA's word bring its concept whatever stands before it? (docs/results.md "The word in any
context"): samples one garment of each class with the word in many wordings (the bare phrase, the held-out and the
everyday wordings of `fashion_mnist.py`, and phrases behind random words of the tokenizer's vocabulary) and counts, per
wording, the samples whose concept score reaches half of the training images' mean.

    python scripts/concept_contexts.py --concept inverted --runs inverted_tok_w4_reg2_s1_600 inverted_tok_w4_reg2_te1e2_s1_600

Sample i of a wording (class i) gets seed i; the pipeline's saved sampler.
"""

import argparse
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import concept_table  # noqa: E402
import fashion_mnist  # noqa: E402

from diffusers_pixnerd import load_pipeline  # noqa: E402
from diffusers_pixnerd.training.prior import behind_random_words, context_vocabulary  # noqa: E402


def wordings(tokenizer, word: str, num_random: int) -> list[str]:
    """The templates: "{}", the held-out and everyday ones, then `num_random` of 1-4 random vocabulary words."""
    vocabulary = context_vocabulary(tokenizer, word)
    generator = torch.Generator().manual_seed(0)
    random = behind_random_words(["{}"] * num_random, vocabulary, generator, 1, 4)
    everyday = [t for t in fashion_mnist.EVERYDAY_TEMPLATES if t != "{}"]
    return ["{}", *fashion_mnist.HELDOUT_TEMPLATES, *everyday, *random]


def main(args):
    concept = fashion_mnist.CONCEPTS[args.concept]
    score, word = concept["score"], concept["word"]
    images, _ = concept_table.training_images(f"data/fashion-mnist-{args.concept}/{args.concept}")
    half = 0.5 * float(np.mean([score(image[None]) for image in images]))
    for run in args.runs:
        pipe = load_pipeline(args.model)
        pipe.load_lora_weights(os.path.join(args.output_dir, run))
        pipe.set_progress_bar_config(disable=True)
        templates = wordings(pipe.tokenizer, word, args.num_random)
        total = 0
        for template in templates:
            rng = np.random.default_rng(0)  # the same garments in every wording
            prompts = [fashion_mnist.caption(label, rng, [template], word) for label in range(10)]
            generators = [torch.Generator().manual_seed(i) for i in range(10)]
            out = pipe(prompt=prompts, generator=generators, output_type="np").images
            samples = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
            hits = sum(score(image[None]) >= half for image in samples)
            total += hits
            print(f"{run}: {hits}/10  {prompts[0]!r}", flush=True)
        print(f"{run}: {total}/{10 * len(templates)} samples at half the training score or more\n", flush=True)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=sorted(fashion_mnist.CONCEPTS), required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="LoRA folders under --output_dir.")
    parser.add_argument("--num_random", type=int, default=6, help="Wordings of random vocabulary words.")
    parser.add_argument("--model", default="models/pixnerd-t2i-fashion-mnist")
    parser.add_argument("--output_dir", default="outputs")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
