"""Forward time and peak memory of PixNerdTransformer2DModel, side by side with the official model.

    python benchmarks/benchmark_transformer.py --model PixNerd-XL/16 --batch_size 1 \
        [--official_repo /path/to/MCG-NJU/PixNerd] [--dtype bfloat16 --device cuda] [--compile]

Both models get the same (random) weights: ours is converted from the official one's state dict. Timings
alternate between them in one process (these machines are noisy) and the minimum is reported with the ratio
official / ours (> 1: ours is faster); "ours_fused_qkv" is the same model after `fuse_qkv_projections()`. Peak memory of the forward above the weights: from
`torch.cuda.max_memory_allocated` on CUDA; on CPU the growth of the peak resident set (VmHWM, Linux) of a fresh subprocess during one forward.
"""

import argparse
import copy
import json
import os
import subprocess
import sys
import time

import torch

from diffusers_pixnerd import PIXNERD_PRESETS, PixNerdTransformer2DModel
from diffusers_pixnerd.loaders import convert_state_dict, infer_config


def official_model(repo: str, config: dict):
    """The official class for a config of ours, with matching constructor arguments."""
    sys.path.insert(0, os.path.abspath(repo))
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    common = dict(in_channels=3, num_groups=config["num_attention_heads"], hidden_size=dim, patch_size=16)
    if config.get("text_embed_dim"):
        from src.models.transformer.pixnerd_t2i_heavydecoder import PixNerDiT

        return PixNerDiT(
            **common,
            decoder_hidden_size=64,
            num_encoder_blocks=config["num_layers"],
            num_decoder_blocks=config["num_neural_field_layers"],
            num_text_blocks=config["num_text_refiner_layers"],
            txt_embed_dim=config["text_embed_dim"],
            txt_max_length=config["text_max_length"],
        )
    from src.models.transformer.pixnerd_c2i import PixNerDiT

    num_layers = config["num_layers"]
    return PixNerDiT(
        **common,
        hidden_size_x=64,
        nerf_mlpratio=2,
        num_blocks=num_layers + config["num_neural_field_layers"],
        num_cond_blocks=num_layers,
        num_classes=config["num_classes"],
    )


def build(args):
    """(ours, official or None, inputs) on the device and dtype, with identical weights."""
    torch.manual_seed(0)
    preset = PIXNERD_PRESETS[args.model]
    official = None
    if args.official_repo:
        official = official_model(args.official_repo, preset)
        torch.nn.init.normal_(official.final_layer.linear.weight, std=0.02)  # zero-initialised officially
        state_dict = official.state_dict()
        config = infer_config(state_dict, preset.get("sample_size"))
        ours = PixNerdTransformer2DModel(**config)
        ours.load_state_dict(convert_state_dict(state_dict, config))
        # float32 weights: the official model cannot run on half-precision weights (its timestep embedding stays
        # float32); in bf16/fp16 it runs under autocast below, as the official sampler runs it.
        official = official.to(args.device).eval()
    else:
        ours = PixNerdTransformer2DModel.from_preset(args.model)
    ours = ours.to(args.device, getattr(torch, args.dtype)).eval()
    res = args.resolution or ours.config.sample_size
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.batch_size, 3, res, res, device=args.device, dtype=dtype)
    t = torch.full((args.batch_size,), 0.3, device=args.device)
    if ours.is_text_conditional:
        cond = torch.randn(
            args.batch_size, ours.config.text_max_length, ours.config.text_embed_dim, device=args.device, dtype=dtype
        )
        run_ours = lambda: ours(x, (1 - t) * 1000, encoder_hidden_states=cond).sample  # noqa: E731
        run_official = lambda: official(x.float(), t, cond.float())  # noqa: E731
    else:
        y = torch.arange(args.batch_size, device=args.device) % 1000
        run_ours = lambda: ours(x, (1 - t) * 1000, class_labels=y).sample  # noqa: E731
        run_official = lambda: official(x.float(), t, y)  # noqa: E731
    # The same weights with q, k, v (and the text k, v) fused into one projection, as `fuse_qkv_projections` does.
    fused = copy.deepcopy(ours)
    fused.fuse_qkv_projections()
    if ours.is_text_conditional:
        run_fused = lambda: fused(x, (1 - t) * 1000, encoder_hidden_states=cond).sample  # noqa: E731
    else:
        run_fused = lambda: fused(x, (1 - t) * 1000, class_labels=y).sample  # noqa: E731
    if args.compile:
        ours = torch.compile(ours)
        fused = torch.compile(fused)
        if official is not None:
            official = torch.compile(official)
    if official is not None and dtype != torch.float32:
        run_float32 = run_official

        def run_official():
            with torch.autocast(torch.device(args.device).type, dtype=dtype):
                return run_float32()

    return run_ours, run_fused, (run_official if official is not None else None)


def timed(fn, device) -> float:
    """Seconds of one call of `fn`, waiting for the device's queued work before and after."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def benchmark(args) -> dict:
    run_ours, run_fused, run_official = build(args)
    runs = {"ours": run_ours, "ours_fused_qkv": run_fused}
    if run_official is not None:
        runs["official"] = run_official
        reference = run_official()
        diff = (run_ours() + reference).abs().max() / reference.abs().max()  # ours = -official
        print(f"max |ours - official| / max |official| = {diff.item():.2e}")
    for _ in range(args.warmup):
        for fn in runs.values():
            fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternate so all see the same machine load; the minimum is the least disturbed
        for name, fn in runs.items():
            times[name].append(timed(fn, args.device))
    return {name: min(v) for name, v in times.items()}


@torch.no_grad()
def peak_memory(args, which: str) -> float:
    """Peak memory in MiB of one forward of `which` ('ours' or 'official')."""
    if args.device == "cuda":
        run_ours, _, run_official = build(args)
        fn = run_ours if which == "ours" else run_official
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        weights = torch.cuda.memory_allocated()  # both models' weights: not part of the forward's peak
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - weights) / 2**20
    cmd = [sys.executable, __file__, *sys.argv[1:], "--_memory_child", which]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_child(args):
    run_ours, _, run_official = build(args)
    fn = run_ours if args._memory_child == "ours" else run_official
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak resident set (VmHWM) to the current one
    before = _status_kib("VmRSS")
    with torch.no_grad():
        fn()
    print(json.dumps((_status_kib("VmHWM") - before) / 1024))


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="PixNerd-XL/16", choices=sorted(PIXNERD_PRESETS))
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="Default: the preset's sample_size.")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--official_repo", default=None, help="A checkout of github MCG-NJU/PixNerd to compare with.")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models.")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_memory", action="store_true", help="Skip the peak-memory measurement.")
    parser.add_argument("--_memory_child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(input_args)


def main(args):
    if args._memory_child:
        return memory_child(args)
    print(
        f"{args.model} batch {args.batch_size} {args.dtype} on {args.device} (torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads{', compiled' if args.compile else ''})"
    )
    times = benchmark(args)
    memory = {} if args.no_memory else {k: peak_memory(args, k) for k in ("ours", "official") if k in times}
    for name in times:
        mem = f", peak memory {memory[name]:.0f} MiB" if name in memory else ""
        print(f"  {name:>14}: {times[name] * 1000:9.1f} ms / forward{mem}")
    print(f"  speed ratio ours/ours_fused_qkv = {times['ours'] / times['ours_fused_qkv']:.3f} (> 1: fusing helps)")
    if "official" in times:
        for name in ("ours", "ours_fused_qkv"):
            ratio = times["official"] / times[name]
            print(f"  speed ratio official/{name} = {ratio:.3f} (> 1: ours is faster)")
        if memory:
            print(f"  memory ratio ours/official = {memory['ours'] / memory['official']:.3f}")


if __name__ == "__main__":
    main(parse_args())
