# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Repeats short 2-process training runs on CPU (gloo DDP: `accelerate launch --multi_gpu --num_processes 2` and the
script's `--cpu`) under a timeout, to catch a run that does not end on every rank. Not part of the test suite: it takes minutes.

    python scripts/stress_ddp.py --runs 20 --timeout 240 --output_dir outputs/stress_ddp

Each run trains a tiny class-conditional model from scratch for `--steps` steps (checkpoint at the last one, EMA on (the default),
REPA with a tiny DINOv2, one data-loader worker, TensorBoard logs): the set-up under which a run once hung after its
main process had saved the pipeline. A run that outlives `--timeout` is a hang: the Python stacks of every process
still alive are dumped with py-spy (`pip install py-spy`; without it, the process list only) into
`<output_dir>/hang-<i>/` before the processes are killed. The summary (`summary.json`) counts the runs that ended
cleanly (exit code 0, every process gone), failed (another exit code) and hung; the exit code is 1 unless all ended.
Extra arguments after `--` go to the training script (e.g. `-- --dataloader_num_workers 0`).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="How many runs.")
    parser.add_argument("--timeout", type=float, default=240, help="Seconds after which a run counts as hung.")
    parser.add_argument("--steps", type=int, default=4, help="Training steps per run (the last one checkpointed).")
    parser.add_argument("--output_dir", default="outputs/stress_ddp")
    parser.add_argument("--keep_runs", action="store_true", help="Keep every run's folder, not only hung/failed ones.")
    parser.add_argument("extra", nargs="*", help="Arguments for the training script (after `--`).")
    return parser.parse_args(input_args)


def make_assets(folder: str) -> None:
    """Three classes of 4 random 16x16 images, a tiny DINOv2 for REPA and a tiny model config."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from diffusers_pixnerd.testing_utils import TINY_C2I

    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fish"):
        os.makedirs(os.path.join(folder, "classes", name), exist_ok=True)
        for i in range(4):
            pixels = (rng.random((16, 16, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, "classes", name, f"{i}.png"))
    torch.manual_seed(0)
    dinov2 = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    Dinov2Model(dinov2).save_pretrained(os.path.join(folder, "dinov2"))
    config = {k: v for k, v in TINY_C2I.items() if k not in ("sample_size", "num_classes")}
    with open(os.path.join(folder, "tiny.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(marker: str) -> list[int]:
    """The live processes of a run: those whose command line holds `marker` (the run's own output folder), which
    finds the launcher and its workers (torch's launcher starts them in sessions of their own), also those left
    behind when the launcher has exited."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and marker in command_line(int(entry)):  # zombies have ended
            found.append(int(entry))
    return sorted(found)


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def dump_stacks(members: list[int], folder: str) -> None:
    """py-spy's stack dump (with local variables) of each process of `members`, into `folder`."""
    os.makedirs(folder, exist_ok=True)
    py_spy = shutil.which("py-spy")
    with open(os.path.join(folder, "processes.txt"), "w", encoding="utf-8") as f:
        for p in members:
            f.write(f"{p} {command_line(p)}\n")
    if py_spy is None:
        return
    for p in members:
        result = subprocess.run([py_spy, "dump", "--locals", "--pid", str(p)], capture_output=True, text=True)
        with open(os.path.join(folder, f"stack-{p}.txt"), "w", encoding="utf-8") as f:
            f.write(f"{command_line(p)}\n\n{result.stdout}{result.stderr}")


def run_once(index: int, args, assets: str) -> dict:
    out = os.path.abspath(os.path.join(args.output_dir, f"run-{index}"))
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "2",
        "--multi_gpu", "--main_process_port", str(free_port()), "--mixed_precision", "no",
        "--dynamo_backend", "no", os.path.join(ROOT, "examples", "train_pixnerd_c2i.py"),
        "--model_config", os.path.join(assets, "tiny.json"), "--resolution", "16",
        "--train_data_dir", os.path.join(assets, "classes"), "--repa_encoder", os.path.join(assets, "dinov2"),
        "--repa_align_layer", "1", "--train_batch_size", "2", "--max_train_steps", str(args.steps),
        "--checkpointing_steps", str(args.steps), "--dataloader_num_workers", "1", "--cpu",
        "--validation_num_inference_steps", "2", "--report_to", "tensorboard", "--seed", str(index),
        "--output_dir", out, *args.extra,
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    with open(os.path.join(out, "log.txt"), "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            code = process.wait(timeout=args.timeout)
            outcome = "ended" if code == 0 else "failed"
            time.sleep(1)
            if run_processes(out):  # the launcher returned while a process of the run lived on
                outcome = "hung"
        except subprocess.TimeoutExpired:
            code, outcome = None, "hung"
        if outcome == "hung":
            members = run_processes(out)
            dump_stacks(members, os.path.join(args.output_dir, f"hang-{index}"))
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
    seconds = time.perf_counter() - start
    if outcome == "ended" and not args.keep_runs:
        shutil.rmtree(out, ignore_errors=True)
    elif outcome != "ended":
        shutil.copy(os.path.join(out, "log.txt"), os.path.join(args.output_dir, f"log-{outcome}-{index}.txt"))
    return {"run": index, "outcome": outcome, "exit_code": code, "seconds": round(seconds, 1)}


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    assets = os.path.join(args.output_dir, "assets")
    if not os.path.isfile(os.path.join(assets, "tiny.json")):
        make_assets(assets)
    results = []
    for index in range(args.runs):
        result = run_once(index, args, assets)
        results.append(result)
        print(json.dumps(result), flush=True)
    counts = {k: sum(r["outcome"] == k for r in results) for k in ("ended", "failed", "hung")}
    summary = {"runs": len(results), **counts, "timeout": args.timeout, "extra": args.extra, "results": results}
    with open(os.path.join(args.output_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"{counts['ended']} of {len(results)} runs ended cleanly, {counts['failed']} failed, {counts['hung']} hung")
    return 0 if counts["ended"] == len(results) else 1


if __name__ == "__main__":
    sys.exit(main(parse_args()))
