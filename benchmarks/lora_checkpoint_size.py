"""What a training checkpoint of `examples/train_pixnerd_t2i.py` weighs, LoRA (`--use_lora`) vs full fine-tuning.

    python benchmarks/lora_checkpoint_size.py --preset PixNerd-XXL/16-T2I --lora_rank 32
    python benchmarks/lora_checkpoint_size.py --measure models/pixnerd-t2i-fashion-mnist

Without `--measure` it counts, on the meta device (nothing is allocated), the parameters of the preset and of the
LoRA adapters the script adds with its default `--lora_target_modules`, and prints the bytes of a checkpoint: a LoRA
one holds the float32 adapters (`pytorch_lora_weights.safetensors`) and AdamW's two float32 moments of each (plus one
more float32 copy with `--use_ema`, and the float32 REPA projector with its moments with `--use_repa`); before the
adapter-only checkpoints it also held the frozen base (in the bf16 of `--mixed_precision bf16`). `--measure PIPELINE`
trains one step of each kind on a real pipeline folder (CPU, random images) and prints the sizes on disk next to the
same count for that model.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import PIL.Image
import torch
from benchmark_training_memory import LORA_TARGETS  # beside this script: the training script's default targets

from diffusers_pixnerd import PixNerdT2IPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.training import REPAProjector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_pixnerd_t2i.py")
DINOV2_BASE_WIDTH = 768  # facebook/dinov2-base, the default `--repa_encoder`


def count(transformer, rank: int) -> dict[str, int]:
    """Parameters of the base, of the script's default LoRA adapters at `rank`, and of the REPA projector."""
    from peft import LoraConfig

    base = sum(p.numel() for p in transformer.parameters())
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    with torch.device("meta"):
        projector = sum(p.numel() for p in REPAProjector(hidden, DINOV2_BASE_WIDTH).parameters())
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS))
    lora = sum(p.numel() for n, p in transformer.named_parameters() if ".lora_" in n)
    return {"base": base, "lora": lora, "projector": projector}


def sizes(counts: dict[str, int], base_bytes_per_parameter: int = 2) -> dict[str, int]:
    """Checkpoint bytes (tensors only: headers and the small lr / RNG / state files are a few kB more)."""
    adapters = 4 * counts["lora"]
    lora = adapters + 2 * adapters  # float32 adapters + AdamW exp_avg, exp_avg_sq
    return {
        "lora": lora,
        "lora_with_ema": lora + adapters,
        "lora_with_repa": lora + 3 * 4 * counts["projector"],
        "lora_before_adapter_only_checkpoints": lora + base_bytes_per_parameter * counts["base"],
        "full_with_ema": 16 * counts["base"],  # float32 weights, 2 moments, EMA
    }


def measure(pipeline: str) -> dict:
    """One training step of each kind on `pipeline` (CPU), and the bytes of each `checkpoint-1` on disk."""
    transformer = PixNerdT2IPipeline.from_pretrained(pipeline).transformer
    side = transformer.config.sample_size
    result = {"counted": count(transformer, rank=32)}
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        rng = np.random.default_rng(0)
        for i in range(2):
            pixels = (rng.random((side, side, 3)) * 255).astype(np.uint8)
            PIL.Image.fromarray(pixels).save(os.path.join(data, f"{i}.png"))
            with open(os.path.join(data, f"{i}.txt"), "w") as f:
                f.write("a red square")
        for name, extra in (("lora", ["--use_lora", "--lora_rank", "32"]), ("full", [])):
            out = os.path.join(tmp, name)
            command = [sys.executable, SCRIPT, "--pretrained_model_name_or_path", pipeline, "--train_data_dir", data]
            command += ["--max_train_steps", "1", "--train_batch_size", "1", "--no_use_repa", "--report_to", "none"]
            command += ["--validation_num_inference_steps", "1", "--dataloader_num_workers", "0", "--output_dir", out]
            subprocess.run([*command, *extra], check=True, capture_output=True)
            folder = os.path.join(out, "checkpoint-1")
            files = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
            result[name] = {"files": files, "total": sum(files.values())}
    result["predicted (fp32 base)"] = sizes(result["counted"], base_bytes_per_parameter=4)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="PixNerd-XXL/16-T2I")
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--measure", default=None, help="A PixNerdT2IPipeline folder: train one step of each kind.")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure), indent=2))
        return
    with torch.device("meta"):
        transformer = PixNerdTransformer2DModel.from_preset(args.preset)
    counts = count(transformer, args.lora_rank)
    print(json.dumps({"preset": args.preset, "lora_rank": args.lora_rank, "parameters": counts}, indent=2))
    for name, size in sizes(counts).items():
        print(f"{name:40s} {size / 1e6:10.1f} MB  {size / 2**20:10.1f} MiB")


if __name__ == "__main__":
    main()
