# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Command line conversion of the official PixNerd checkpoints (github MCG-NJU/PixNerd) to diffusers folders.

    python -m diffusers_pixnerd.convert --checkpoint PixNerd-XL-P16-C2I.ckpt --output pixnerd-xl-c2i [--no-ema]
    python -m diffusers_pixnerd.convert --pipeline --checkpoint ... --output ...   # a complete pipeline folder

The conversion itself lives in `diffusers_pixnerd.loaders` (reading the file, the key map, config inference) and
`PixNerdTransformer2DModel.from_single_file` / `convert_official_pipeline`; this module is the command line only.
"""

import argparse
import os

import torch

from .models.transformer_pixnerd import PixNerdTransformer2DModel
from .pipelines.loading import convert_official_pipeline
from .pipelines.pipeline_pixnerd_t2i import DEFAULT_TEXT_ENCODER


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="Convert an official PixNerd checkpoint to a diffusers model folder.")
    parser.add_argument("--checkpoint", required=True, help="Official Lightning .ckpt (local path or org/repo/file).")
    parser.add_argument("--output", required=True, help="Folder for `save_pretrained` (config.json + safetensors).")
    parser.add_argument("--no-ema", "--no_ema", dest="ema", action="store_false", help="Use `denoiser.*`, not EMA.")
    parser.add_argument("--sample_size", type=int, default=None, help="Trained resolution (default 256 C2I, 512 T2I).")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument(
        "--pipeline", action="store_true", help="Write a complete pipeline folder (scheduler, labels, text encoder)."
    )
    parser.add_argument("--scheduler_preset", default=None, help="c2i-euler100 (C2I default), c2i-adams50 or t2i.")
    parser.add_argument(
        "--text_encoder", default=DEFAULT_TEXT_ENCODER, help="Text-to-image pipelines: Qwen3 name/path, or 'none'."
    )
    return parser.parse_args(input_args)


def check_output_folder(output: str):
    """`--output` must be a folder that can be written: not an existing file, and its parent writable."""
    if os.path.exists(output) and not os.path.isdir(output):
        raise SystemExit(f"error: `--output` {output!r} is an existing file; give a folder to write the model into.")
    parent = os.path.dirname(os.path.abspath(output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    target = output if os.path.isdir(output) else parent
    if not os.access(target, os.W_OK):
        raise SystemExit(f"error: `--output` {output!r} cannot be written (no write permission on {target!r}).")


def main(input_args=None):
    args = parse_args(input_args)
    check_output_folder(args.output)
    dtype = getattr(torch, args.dtype)
    if args.pipeline:
        text_encoder = None if args.text_encoder.lower() == "none" else args.text_encoder
        pipe = convert_official_pipeline(
            args.checkpoint,
            ema=args.ema,
            sample_size=args.sample_size,
            dtype=dtype,
            scheduler_preset=args.scheduler_preset,
            text_encoder=text_encoder,
        )
        pipe.save_pretrained(args.output)
        print(f"Wrote the {type(pipe).__name__} folder {args.output}")
        return
    model = PixNerdTransformer2DModel.from_single_file(
        args.checkpoint, ema=args.ema, sample_size=args.sample_size, dtype=dtype
    )
    model.save_pretrained(args.output)
    print(f"Wrote {args.output} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")


if __name__ == "__main__":
    main()
