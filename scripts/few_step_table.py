"""The few-step table of docs/results.md: the bundled text-to-image model at 1, 2, 4 and 8 steps with and without
CFG, the same with the turbo LoRA (no CFG), and the default sampler, on both held-out prompt sets; the red LoRA
stacked with the turbo LoRA. Each row is one `examples/evaluate.py` run (1,000 samples, sample i seeded with i, the
reference classifier, FID against the first 1,000 test images) in its own folder under `--output_dir`; a row whose
`metrics.json` exists is read, not run again, so the script can be stopped and started again.

    python examples/fashion_mnist.py prompts --num 1000 --output data/heldout_prompts.jsonl
    python examples/fashion_mnist.py prompts --set everyday --num 1000 --output data/everyday_prompts.jsonl
    python examples/fashion_mnist.py prompts --prefix red --num 200 --output data/red_prompts.jsonl
    OMP_NUM_THREADS=1 python scripts/few_step_table.py --output_dir outputs/few_step
"""

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "models/pixnerd-t2i-fashion-mnist"
TURBO = "models/pixnerd-t2i-fashion-mnist-turbo-lora"
RED = "models/pixnerd-t2i-fashion-mnist-red-lora"
SETS = {"set 1": "data/heldout_prompts.jsonl", "set 2": "data/everyday_prompts.jsonl"}
CLASSIFIER = "models/fashion-mnist-classifier.safetensors"


def rows(args) -> list[dict]:
    """Every row: its name, the evaluate.py flags and the prompt set."""
    table = []
    for set_name in SETS:  # the base model first (the LoRA may still be training)
        table.append(dict(name="default sampler (Adams-2, 50 steps, CFG 5)", set=set_name, flags=[]))
        for steps in args.steps:
            for guidance in (5.0, 1.0):
                cfg = "CFG 5" if guidance > 1 else "no CFG"
                flags = ["--num_inference_steps", steps, "--guidance_scale", guidance]
                # FID for the 4-step rows of set 1 only: each FID costs minutes of Inception on a CPU.
                fid = set_name == "set 1" and steps == 4
                name = f"undistilled, Adams-2, {steps} steps, {cfg}"
                table.append(dict(name=name, set=set_name, flags=flags, fid=fid))
    for set_name in SETS:
        for steps in args.steps:
            flags = ["--lora", args.turbo, "--num_inference_steps", steps]
            table.append(dict(name=f"turbo LoRA, Euler, {steps} steps, no CFG", set=set_name, flags=flags))
    for row in table:
        row["prompts"] = SETS[row["set"]]
    red = dict(set="red", prompts=args.red_prompts, num_samples=200, fid=False)
    table.append(dict(red, name="red LoRA, default sampler", flags=["--lora", args.red]))
    table.append(dict(red, name="red LoRA + turbo LoRA, 4 steps, no CFG", flags=["--lora", args.turbo, args.red]))
    table.append(dict(red, name="turbo LoRA alone, 4 steps, no CFG", flags=["--lora", args.turbo]))
    table.append(dict(red, name="base, default sampler", flags=[]))
    return table


def folder_of(row, output_dir) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in f"{row['set']}_{row['name']}").strip("_")
    return os.path.join(output_dir, slug)


def run(row, args) -> dict:
    folder = folder_of(row, args.output_dir)
    metrics = os.path.join(folder, "metrics.json")
    if not os.path.isfile(metrics):
        command = [sys.executable, "examples/evaluate.py", "--model", BASE, "--prompt_file", row["prompts"]]
        command += ["--num_samples", row.get("num_samples", args.num_samples), "--batch_size", 50]
        command += ["--classifier", CLASSIFIER, "--output_dir", folder, *row["flags"]]
        if row.get("fid", True):
            command += [
                "--reference",
                "fashion-mnist-test",
                "--reference_cache",
                os.path.join(args.output_dir, "reference"),
            ]
        print(" ".join(map(str, command)), flush=True)
        subprocess.run([str(c) for c in command], check=True, cwd=ROOT)
    with open(metrics) as f:
        return json.load(f)


def main(args):
    results = [(row, run(row, args)) for row in rows(args) if args.only is None or row["set"] == args.only]
    by_name = {}
    for row, m in results:
        by_name.setdefault(row["name"], {})[row["set"]] = m
    print("| sampling | set 1 accuracy | set 1 FID | set 2 accuracy | set 2 FID |")
    print("|---|---|---|---|---|")
    for name, sets in by_name.items():
        if "red" in sets:
            continue
        cells = []
        for set_name in SETS:
            m = sets.get(set_name)
            cells += (
                ["-", "-"]
                if m is None
                else [f"{100 * m['class_accuracy']:.1f}%", f"{m['fid']:.1f}" if "fid" in m else "-"]
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("| sampling (red prompts) | redness | class accuracy |")
    print("|---|---|---|")
    for name, sets in by_name.items():
        if "red" in sets:
            print(f"| {name} | {sets['red']['redness']:.3f} | {100 * sets['red']['class_accuracy']:.1f}% |")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/few_step")
    parser.add_argument("--turbo", default=TURBO)
    parser.add_argument("--red", default=RED)
    parser.add_argument("--red_prompts", default="data/red_prompts.jsonl")
    parser.add_argument("--num_samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--only", default=None, help='Only the rows of one set: "set 1", "set 2" or "red".')
    return parser.parse_args(input_args)


if __name__ == "__main__":
    main(parse_args())
