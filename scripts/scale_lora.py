"""Bake an adapter weight into a LoRA file: every `lora_B` matrix times `--scale`, so that loading the result at
weight 1 equals loading the input with `set_adapters(name, scale)` (the LoRA delta is `B @ A * alpha / rank`, linear
in B). The other files of the folder (model card, `few_step_sampler.json`, validation images) are copied as they are.

    python scripts/scale_lora.py --lora outputs/turbo --scale 0.8 --output models/pixnerd-t2i-fashion-mnist-turbo-lora
"""

import argparse
import os
import shutil

from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS = "pytorch_lora_weights.safetensors"


def scale_lora(source: str, scale: float, output: str) -> int:
    """Writes the scaled LoRA folder; returns the number of scaled matrices."""
    if not os.path.isfile(os.path.join(source, WEIGHTS)):
        raise ValueError(f"`--lora` {source!r} holds no {WEIGHTS}.")
    state = load_file(os.path.join(source, WEIGHTS))
    with safe_open(os.path.join(source, WEIGHTS), "pt") as f:
        metadata = f.metadata() or {"format": "pt"}  # diffusers' `lora_adapter_metadata` (rank, alpha, targets)
    scaled = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
    count = sum(".lora_B." in k for k in state)
    if not count:
        raise ValueError(f"{os.path.join(source, WEIGHTS)} has no `lora_B` matrices.")
    if os.path.abspath(source) != os.path.abspath(output):
        shutil.copytree(source, output, dirs_exist_ok=True, ignore=shutil.ignore_patterns(WEIGHTS, "checkpoint-*"))
    temporary = os.path.join(output, WEIGHTS + ".tmp")
    save_file({k: v.contiguous() for k, v in scaled.items()}, temporary, metadata=metadata)
    os.replace(temporary, os.path.join(output, WEIGHTS))
    return count


def main(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora", required=True, help="A LoRA folder (diffusers format).")
    parser.add_argument("--scale", type=float, required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(input_args)
    count = scale_lora(args.lora, args.scale, args.output)
    print(f"Scaled {count} lora_B matrices by {args.scale} into {args.output}")


if __name__ == "__main__":
    main()
