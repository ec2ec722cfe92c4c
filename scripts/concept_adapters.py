"""Which part of a concept LoRA carries it (docs/results.md "Where the pattern's leak came from"): samples held-out
prompts with the run's adapters on, with the text encoder's switched off and with the transformer's switched off, and
counts the samples whose concept score passes 5% of the training images' (as scripts/concept_table.py does); then the
text encoder's relative change, sum((adapted - base)^2) / sum(base^2) of the encoded prompts, on prompts with the word,
without it, and on captions behind random vocabulary words (`--text_preservation_weight`'s prompts).

    python scripts/concept_adapters.py --concept checkered --run checkered_w2_600 --wording "clothing catalogue:"

Seeds as examples/evaluate.py (sample i of the prompt file gets seed i), the pipeline's saved sampler.
"""

import argparse
import json
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
from diffusers_pixnerd.training.lora import adapters_disabled  # noqa: E402
from diffusers_pixnerd.training.objectives import encode_prompts  # noqa: E402
from diffusers_pixnerd.training.prior import context_vocabulary, random_context_prompts  # noqa: E402


def read_prompts(path: str, num: int) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f][:num]


def main(args):
    concept = fashion_mnist.CONCEPTS[args.concept]
    score, word = concept["score"], concept["word"]
    images, _ = concept_table.training_images(f"data/fashion-mnist-{args.concept}/{args.concept}")
    reference = float(np.mean([score(image[None]) for image in images]))
    pipe = load_pipeline(args.model)
    pipe.load_lora_weights(os.path.join(args.output_dir, args.run))
    pipe.set_progress_bar_config(disable=True)
    prompts = {
        "with the word": read_prompts(f"data/{args.concept}_prompts.jsonl", args.num_samples),
        "without it": read_prompts("data/plain_prompts.jsonl", args.num_samples),
    }
    for name, rows in prompts.items():
        index = [i for i, prompt in enumerate(rows) if prompt.startswith(args.wording)]
        for part, modules in (("both on", ()), ("text encoder's off", (pipe.text_encoder,)),
                              ("transformer's off", (pipe.transformer,))):  # fmt: skip
            with adapters_disabled(*modules):
                generators = [torch.Generator().manual_seed(i) for i in index]
                out = pipe(prompt=[rows[i] for i in index], generator=generators, output_type="np").images
            samples = np.clip(np.round(out * 255), 0, 255).astype(np.uint8)
            scores = np.array([score(image[None]) for image in samples]) / reference
            print(f"{name} ({args.wording or 'all'!r}, {len(index)} prompts), adapters {part}: "
                  f"{100 * scores.mean():.0f}% of the training score, {(scores >= 0.05).sum()} above 5%")  # fmt: skip

    random_contexts = random_context_prompts(
        prompts["with the word"], word, context_vocabulary(pipe.tokenizer, word), seed=0
    )
    config = pipe.transformer.config
    for name, texts in (*prompts.items(), ("random contexts", random_contexts)):
        with torch.no_grad():
            with adapters_disabled(pipe.text_encoder):
                base = encode_prompts(pipe.text_encoder, pipe.tokenizer, texts, config, "cpu")
            adapted = encode_prompts(pipe.text_encoder, pipe.tokenizer, texts, config, "cpu")
        change = float((adapted - base).pow(2).sum() / base.pow(2).sum())
        print(f"text encoder's relative change, {name}: {change:.4f}")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concept", choices=sorted(fashion_mnist.CONCEPTS), required=True)
    parser.add_argument("--run", required=True, help="The LoRA folder under --output_dir.")
    parser.add_argument("--wording", default="", help="Only the prompts that start with this (default: all).")
    parser.add_argument("--num_samples", type=int, default=200)
    parser.add_argument("--model", default="models/pixnerd-t2i-fashion-mnist")
    parser.add_argument("--output_dir", default="outputs")
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
