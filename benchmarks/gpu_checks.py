"""Every GPU number in one prepared run: dtype parity, training memory, attention backends, offloading, compile, speed.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_checks.py --official_repo /path/to/MCG-NJU/PixNerd --output_dir $OUT
    python benchmarks/gpu_checks.py --smoke --official_repo /path/to/MCG-NJU/PixNerd --output_dir /tmp/gpu_checks_smoke

The checks build on the benchmarks beside this file (`build(args, device)` and their timing), imported as the
modules of this folder.

On a GPU machine without network access, install diffusers from a wheel downloaded beforehand (`pip download
--no-deps -d .whl diffusers==0.42.1`) and put this package on the path without installing it:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src;
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_checks.py --official_repo .official/PixNerd --output_dir $OUT

Sized for one run of under ten minutes on one H100/H200-class GPU: the seven checks take about 4 to 5 minutes there
(estimated, not yet measured: about half of it is torch.compile's cold compilation and building the official XL
model on the CPU), and `--time_budget` (default 420 s) caps the whole run. Each check runs in
its own Python process under its own time limit (`--timeouts`, at most what is left of the budget), so a check that
fails, hangs or crashes (a CUDA error poisons its process) keeps the rows it finished and the next one still runs;
within a check every row (a dtype, a backend, a variant) has its own try/except and records its error. Results go to
`--output_dir` (default `$OUT`, else outputs/gpu_checks): `gpu_checks.json` (everything, errors in full),
`gpu_checks.md` (the tables, also printed at the end) and `gpu_checks.log` (the checks' own output, tracebacks).

Models have random weights (the zero-initialised `neural_field.proj_out` gets N(0, 0.02), so outputs are not zero);
"rel err" is max|x - reference| / max|reference|. Sizes, steps and repeats are flags (GPU defaults in brackets).
1. parity: bf16 and fp16 forwards of PixNerd-XL/16 (C2I, 256 px, batch 4) and PixNerd-XXL/16-T2I (512 px, batch 1,
   random `encoder_hidden_states`) against their fp32 forward (TF32 off): max and mean rel err, finiteness, time.
1b. training: `benchmarks/benchmark_training_memory.py` on PixNerd-XXL/16-T2I (random weights, random 2048-wide prompt
   embeddings): LoRA r32 at 512 px batch 1 and 4; full fine-tuning at 512 px batch 1 (8-bit AdamW, EMA on the CPU),
   with bf16 weights (`adamw_bf16`) at batch 1 and 4, at 256 px, and with plain AdamW and the EMA on the GPU;
   gradient checkpointing on; `torch.cuda.max_memory_allocated` and s/step (the best of 3 steps).
2. attention: `set_attention_backend(name)` for every diffusers backend that needs no Hub download (native, the
   `_native_*` SDPA kernels, flash, _flash_3, sage, xformers, flex, ...) on XL/16 in `--dtype` [bf16], batch 4: rel
   err against "native", first-call and steady time; a backend that is not installed or fails records its error.
3. offload: a PixNerdPipeline (XL/16, `--dtype`, batch 4, `--offload_steps` [4]) all on the GPU, with
   `enable_model_cpu_offload()`, with `enable_group_offload` block_level (1 block per group) and leaf_level with
   `use_stream=True`: max |image - on-GPU image|, first-call and best time, `torch.cuda.max_memory_allocated`.
4. forward_speed: `benchmarks/benchmark_transformer.py` for XL/16 at batch 4 and 1: ours, ours with fused qkv and the
   official model (`--official_repo`) in fp32 weights under bf16 autocast (how the official sampler runs it: its
   model cannot run on bf16 weights), and ours on bf16 weights; time per forward and peak memory of the forward.
5. official_sampling: `benchmarks/benchmark_official_sampling.py --config PixNerd-XL/16`: our 50-step CFG pipeline vs
   the official Adams-2 sampler (bf16 autocast, as it always runs on CUDA) on the same weights and noise, batch 4;
   ours once under the same autocast and once on bf16 weights.
6. cache_sampling: `benchmarks/benchmark_sampling.py` on a random XL/16 pipeline (`--dtype`, batch 4, 50 steps): no
   cache vs each of `--cache_variants` (FirstBlockCache 0.2, TaylorSeer): speed only, the images of random weights
   say nothing about quality.
7. compile: XL/16 in `--dtype`, batch 4: eager vs `compile_repeated_blocks(fullgraph=True)` vs
   `torch.compile(model, fullgraph=True)`: first call (the compilation), second call, best steady time, speed-up, rel
   err. Last, as the slowest: a timeout there still leaves everything else.

`--smoke` runs every check with tiny models (2 DiT blocks of 2 x 16, 32 px, 2 steps) to test the script; on the CPU
the CUDA-only rows record "skipped: needs CUDA" and compilation uses the "eager" backend.
"""

import argparse
import contextlib
import copy
import datetime
import functools
import gc
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback

# The benchmarks beside this script (its folder is on sys.path when it runs).
import benchmark_official_sampling as official_sampling
import benchmark_sampling as sampling
import benchmark_training_memory as training_memory
import benchmark_transformer as transformer_bench
import diffusers
import torch
from diffusers.models.attention_dispatch import AttentionBackendName

from diffusers_pixnerd import (
    PIXNERD_PRESETS,
    PixNerdFlowMatchScheduler,
    PixNerdPipeline,
    PixNerdTransformer2DModel,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHECKS = ["parity", "training", "attention", "offload", "forward_speed", "official_sampling", "cache_sampling", "compile"]
TITLES = {
    "parity": "bf16 / fp16 forward vs fp32 (rel err = max|x - fp32| / max|fp32|)",
    "training": "training steps (benchmark_training_memory.py): peak memory (max_memory_allocated) and s/step",
    "attention": "attention backends (`set_attention_backend`), rel err vs native",
    "offload": "offloading on a pipeline: images vs all on the GPU, time, peak memory",
    "forward_speed": "forward time, ours vs official (benchmark_transformer.py); ratios > 1: ours is faster",
    "official_sampling": "50-step CFG sampling, our pipeline vs the official sampler (benchmark_official_sampling.py)",
    "cache_sampling": "pipeline sampling with a cache vs none (benchmark_sampling.py), random weights: speed only",
    "compile": "torch.compile: regional and full vs eager",
}
# Seconds per check on an H200 (estimates with a margin); all together capped by --time_budget.
TIMEOUTS = dict(
    parity=90, training=150, attention=120, offload=120, forward_speed=120, official_sampling=150, cache_sampling=120, compile=300
)
# Tried in this order (the native kernels first, flex last: it may compile); then any other backend diffusers knows,
# except those that download a Hub kernel (the device machine has no network) and the NPU / XLA ones.
ATTENTION_BACKENDS = [
    "native",
    "_native_cudnn",
    "_native_flash",
    "_native_efficient",
    "_native_math",
    "flash",
    "flash_varlen",
    "_flash_3",
    "_flash_varlen_3",
    "sage",
    "sage_varlen",
    "xformers",
]
SMOKE_C2I = dict(
    sample_size=32,
    patch_size=4,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    num_neural_field_layers=1,
    neural_field_hidden_size=8,
    num_classes=10,
)
SMOKE_PRESETS = {
    "smoke-C2I": SMOKE_C2I,
    "smoke-T2I": dict(SMOKE_C2I, num_classes=None, text_embed_dim=24, text_max_length=6, num_text_refiner_layers=1),
}
GPU_DEFAULTS = dict(
    model="PixNerd-XL/16",
    t2i_model="PixNerd-XXL/16-T2I",
    batch_size=4,
    forward_batch_sizes=[4, 1],
    repeats=10,
    offload_steps=4,
    sampling_steps=50,
    sampling_repeats=3,
    official_sampling_config="PixNerd-XL/16",
    compile_backend="inductor",
    time_budget=420.0,
)
SMOKE_DEFAULTS = dict(
    GPU_DEFAULTS,
    model="smoke-C2I",
    t2i_model="smoke-T2I",
    batch_size=2,
    forward_batch_sizes=[2, 1],
    repeats=2,
    offload_steps=2,
    sampling_steps=2,
    sampling_repeats=1,
    official_sampling_config="fashion-mnist",
    time_budget=1800.0,
)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


class Skipped(Exception):
    """A row or check that cannot run here; recorded as "skipped: <reason>"."""


def free_memory(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mib(device: str) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def needs_cuda(device: str) -> None:
    if torch.device(device).type != "cuda":
        raise Skipped("needs CUDA")


def timed_output(fn, device: str):
    """(seconds, output) of one call; `benchmark_transformer.timed` keeps only the time."""
    output = []
    seconds = transformer_bench.timed(lambda: output.append(fn()), device)
    return seconds, output[0]


def best_ms(fn, device: str, repeats: int) -> float:
    """The least disturbed of `repeats` timed calls, in milliseconds."""
    return min(transformer_bench.timed(fn, device) for _ in range(repeats)) * 1000


def rel_err(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.float(), reference.float()
    return ((output - reference).abs().max() / reference.abs().max()).item()


def mean_rel_err(output: torch.Tensor, reference: torch.Tensor) -> float:
    output, reference = output.float(), reference.float()
    return ((output - reference).abs().mean() / reference.abs().mean()).item()


def autocast(device: str):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def make_model(name: str, device: str, dtype: torch.dtype = torch.float32) -> PixNerdTransformer2DModel:
    """A preset with seeded random weights, built on `device` (fast on a GPU); the zero-initialised
    `neural_field.proj_out` gets N(0, 0.02) weights so that outputs are not trivially zero."""
    torch.manual_seed(0)
    with torch.device(device):
        model = PixNerdTransformer2DModel.from_preset(name)
        torch.nn.init.normal_(model.neural_field.proj_out.weight, std=0.02)
    return model.to(dtype).eval()


def make_inputs(model: PixNerdTransformer2DModel, batch_size: int, resolution: int | None, device: str) -> dict:
    """Forward keyword arguments in float32 (the model casts them), drawn on the CPU with a fixed seed."""
    config = model.config
    resolution = resolution or config.sample_size
    generator = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(batch_size, config.in_channels, resolution, resolution, generator=generator),
        timestep=torch.rand(batch_size, generator=generator) * 1000,
    )
    if model.is_text_conditional:
        inputs["encoder_hidden_states"] = torch.randn(
            batch_size, config.text_max_length, config.text_embed_dim, generator=generator
        )
    else:
        inputs["class_labels"] = torch.arange(batch_size) % config.num_classes
    return {key: value.to(device) for key, value in inputs.items()}


def forward(model, inputs: dict) -> torch.Tensor:
    return model(**inputs).sample


def make_pipeline(transformer: PixNerdTransformer2DModel, steps: int) -> PixNerdPipeline:
    """A class-conditional pipeline with CFG (scale 3.5 over the whole interval) and the order-2 sampler."""
    pipe = PixNerdPipeline(transformer=transformer, scheduler=PixNerdFlowMatchScheduler(num_inference_steps=steps))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Recorder:
    """The rows of one check, written to a JSON file after each row (so a check stopped at its time limit keeps
    the rows it finished)."""

    def __init__(self, path: str):
        self.path = path
        self.data = {"status": "running", "rows": {}}

    def flush(self) -> None:
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(self.path + ".tmp", self.path)

    @contextlib.contextmanager
    def row(self, name: str):
        """Yields the row's dict to fill; an exception inside is recorded in it and does not stop the check."""
        values = self.data["rows"].setdefault(name, {})
        values["status"] = "running"
        self.flush()
        try:
            yield values
            values["status"] = "ok"
        except Skipped as reason:
            values["status"] = f"skipped: {reason}"
        except Exception as error:
            values["status"] = "error"
            values["error"] = f"{type(error).__name__}: {error}"[:2000]
            traceback.print_exc()
            print(flush=True)
        finally:
            self.flush()


# ---------------------------------------------------------------------------------------------------------------------
# The checks. Each takes the parsed arguments and a Recorder, and runs in its own process (`--_check NAME`).


def check_parity(args, rec: Recorder):
    for name, resolution, batch_size in (
        (args.model, args.resolution, args.batch_size),
        (args.t2i_model, args.t2i_resolution, 1),
    ):
        label = f"{name} b{batch_size}"
        with rec.row(f"{label} float32") as row:
            model = make_model(name, args.device)
            inputs = make_inputs(model, batch_size, resolution, args.device)
            row["px"] = inputs["hidden_states"].shape[-1]
            reference = forward(model, inputs)
            row["ms"] = best_ms(functools.partial(forward, model, inputs), args.device, 3)
            row["max_abs_output"] = reference.abs().max().item()
            row["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        if row["status"] != "ok":
            continue
        for dtype in (torch.bfloat16, torch.float16):
            with rec.row(f"{label} {str(dtype).removeprefix('torch.')}") as row:
                low = copy.deepcopy(model).to(dtype)
                output = forward(low, inputs)
                row["ms"] = best_ms(functools.partial(forward, low, inputs), args.device, 3)
                row["max_rel_err"] = rel_err(output, reference)
                row["mean_rel_err"] = mean_rel_err(output, reference)
                row["finite"] = bool(output.isfinite().all())
                del low
        del model, inputs, reference
        free_memory(args.device)


def attention_backends(args) -> list[str]:
    if args.attention_backends:
        return args.attention_backends
    names = list(ATTENTION_BACKENDS)
    for backend in AttentionBackendName:
        skip = any(part in backend.value for part in ("hub", "npu", "xla"))
        if backend.value not in names and backend.value != "flex" and not skip:
            names.append(backend.value)
    return names + ["flex"]


def check_attention(args, rec: Recorder):
    dtype = getattr(torch, args.dtype)
    model = make_model(args.model, args.device, dtype)
    inputs = make_inputs(model, args.batch_size, args.resolution, args.device)
    run = lambda: forward(model, inputs)
    reference = native_ms = None
    for name in ["native"] + [name for name in attention_backends(args) if name != "native"]:
        with rec.row(name) as row:
            try:
                model.set_attention_backend(name)
                row["first_call_s"], output = timed_output(run, args.device)
                row["ms"] = best_ms(run, args.device, args.repeats)
                if name == "native":  # the reference of the others
                    reference, native_ms = output, row["ms"]
                row["speedup_vs_native"] = native_ms / row["ms"]
                row["max_rel_err"] = rel_err(output, reference)
                row["finite"] = bool(output.isfinite().all())
            finally:
                model.reset_attention_backend()


def check_offload(args, rec: Recorder):
    device, dtype = args.device, getattr(torch, args.dtype)
    base = make_model(args.model, device, dtype).to("cpu")  # built on the GPU (fast), each variant copies it
    labels = [i % base.config.num_classes for i in range(args.batch_size)]

    def sample(pipe):
        generators = [torch.Generator().manual_seed(i) for i in range(args.batch_size)]
        return pipe(class_labels=labels, generator=generators, output_type="latent").images

    def group_offload(**kwargs):
        return lambda pipe: pipe.transformer.enable_group_offload(torch.device(device), offload_device="cpu", **kwargs)

    variants = {  # name: (setup, needs CUDA)
        f"none (all on {device})": (lambda pipe: pipe.to(device), False),
        "enable_model_cpu_offload()": (lambda pipe: pipe.enable_model_cpu_offload(device=device), True),
        "group_offload block_level, 1 block/group": (
            group_offload(offload_type="block_level", num_blocks_per_group=1),
            False,
        ),
        "group_offload leaf_level, use_stream": (group_offload(offload_type="leaf_level", use_stream=True), True),
    }
    reference = None
    for name, (setup, cuda_only) in variants.items():
        with rec.row(name) as row:
            if cuda_only:
                needs_cuda(device)
            pipe = make_pipeline(copy.deepcopy(base), args.offload_steps)
            setup(pipe)
            reset_peak_memory(device)
            row["first_call_s"], images = timed_output(functools.partial(sample, pipe), device)
            row["best_s"] = min(transformer_bench.timed(functools.partial(sample, pipe), device) for _ in range(2))
            row["peak_memory_mib"] = peak_memory_mib(device)
            images = images.float().cpu()
            if reference is None:
                reference = images
            row["max_abs_diff_vs_first"] = (images - reference).abs().max().item()
            row["equal_to_first"] = torch.equal(images, reference)
            del pipe
        free_memory(device)


def check_forward_speed(args, rec: Recorder):
    device = args.device
    for batch_size in args.forward_batch_sizes:
        for mode in ("autocast bf16", "bf16 weights"):
            with rec.row(f"{args.model} b{batch_size}, {mode}") as row:
                with_autocast = mode == "autocast bf16"
                options = ["--model", args.model, "--batch_size", str(batch_size), "--device", device]
                options += ["--dtype", "float32" if with_autocast else "bfloat16", "--repeats", str(args.repeats)]
                options += ["--warmup", "2"]
                if with_autocast and args.official_repo:  # the official model runs on fp32 weights only
                    options += ["--official_repo", args.official_repo]
                bench_args = transformer_bench.parse_args(options)
                printed = io.StringIO()
                # Built under the device (fast random init on the GPU); both models under the same autocast.
                context = autocast(device) if with_autocast else contextlib.nullcontext()
                with torch.device(device), context, contextlib.redirect_stdout(printed):
                    times = transformer_bench.benchmark(bench_args)
                    memory = {}
                    if torch.device(device).type == "cuda":
                        for name in ("ours", "official"):  # peak_memory knows these two
                            if name in times:
                                memory[name] = transformer_bench.peak_memory(bench_args, name)
                for name, seconds in times.items():
                    row[f"{name}_ms"] = seconds * 1000
                    if name in memory:
                        row[f"{name}_peak_mib"] = memory[name]
                if "official" in times:
                    row["official/ours"] = times["official"] / times["ours"]
                    row["official/ours_fused_qkv"] = times["official"] / times["ours_fused_qkv"]
                    match = re.search(r"max \|ours - official\| / max \|official\| = (\S+)", printed.getvalue())
                    row["rel_err_vs_official"] = float(match.group(1)) if match else None
                free_memory(device)


def check_official_sampling(args, rec: Recorder):
    if not args.official_repo:
        raise Skipped("needs --official_repo")
    device = args.device
    options = ["--official_repo", args.official_repo, "--config", args.official_sampling_config]
    options += ["--batch_size", str(args.sampling_batch_size or args.batch_size)]
    options += ["--num_inference_steps", str(args.sampling_steps), "--repeats", str(args.sampling_repeats)]
    bench_args = official_sampling.parse_args(options)
    run_ours, run_official, pipe = official_sampling.build(bench_args, device)

    def ours_autocast():
        with autocast(device):
            return run_ours()

    with rec.row("ours on fp32 weights under bf16 autocast (as the official sampler)") as row:
        row.update(official_sampling.compare(ours_autocast, run_official, bench_args.repeats, device))
    with rec.row("ours on bf16 weights") as row:
        pipe.transformer.to(torch.bfloat16)
        row.update(official_sampling.compare(run_ours, run_official, bench_args.repeats, device))


def check_cache_sampling(args, rec: Recorder):
    device, dtype = args.device, getattr(torch, args.dtype)
    # A random pipeline of the preset, on the device, in --dtype, for each variant of benchmark_sampling.
    random_pipeline = lambda: make_pipeline(make_model(args.model, device, dtype), args.sampling_steps)  # noqa: E731
    for variant in args.cache_variants:
        with rec.row(variant) as row:
            options = ["--model", args.model, "--variants", "none", variant, "--warmup", "1", "--device", device]
            options += ["--batch_size", str(args.sampling_batch_size or args.batch_size)]
            options += ["--num_inference_steps", str(args.sampling_steps), "--repeats", str(args.sampling_repeats)]
            bench_args = sampling.parse_args(options)
            pipes = sampling.build(bench_args, device, make_pipeline=random_pipeline)
            results = {result.pop("variant"): result for result in sampling.benchmark(bench_args, pipes, device)}
            row.update(results[variant])
            row["none_first_call_s"] = results["none"]["first_call_s"]
            row["none_min_s"] = results["none"]["min_s"]
            del pipes
            free_memory(device)


def check_compile(args, rec: Recorder):
    device, dtype = args.device, getattr(torch, args.dtype)
    model = make_model(args.model, device, dtype)
    inputs = make_inputs(model, args.batch_size, args.resolution, device)
    with rec.row("eager") as row:
        reference = forward(model, inputs)
        row["ms"] = eager_ms = best_ms(lambda: forward(model, inputs), device, args.repeats)

    def regional():
        compiled = copy.deepcopy(model)
        compiled.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend)
        return compiled

    def full():
        return torch.compile(model, fullgraph=True, backend=args.compile_backend)

    for name, make in (
        ("compile_repeated_blocks(fullgraph=True)", regional),
        ("torch.compile(model, fullgraph=True)", full),
    ):
        with rec.row(name) as row:
            row["backend"] = args.compile_backend
            torch.compiler.reset()
            compiled = make()
            run = functools.partial(forward, compiled, inputs)
            row["first_call_s"], output = timed_output(run, device)
            row["second_call_s"] = transformer_bench.timed(run, device)
            row["ms"] = best_ms(run, device, args.repeats)
            row["speedup_vs_eager"] = eager_ms / row["ms"]
            row["max_rel_err_vs_eager"] = rel_err(output, reference)
            del compiled, run
            free_memory(device)


# The training runs of docs/training.md#memory: (method, resolution, batch, extra benchmark flags).
TRAINING_RUNS = [
    ("lora", 512, 1, []),
    ("lora", 512, 4, []),
    ("full", 512, 1, []),
    ("full", 512, 1, ["--optimizer", "adamw_bf16"]),
    ("full", 512, 4, ["--optimizer", "adamw_bf16"]),
    ("full", 256, 1, []),
    ("full", 512, 1, ["--optimizer", "adamw", "--ema_device", "accelerator"]),
]


def check_training(args, rec: Recorder):
    """XXL/16-T2I LoRA and full fine-tuning steps, built as the training scripts do (`benchmark_training_memory`)."""
    for method, resolution, batch_size, extra in TRAINING_RUNS:
        resolution = PIXNERD_PRESETS[args.t2i_model]["sample_size"] if args.smoke else resolution
        flags = ["--preset", args.t2i_model, "--method", method, "--resolution", str(resolution), "--batch_size",
                 str(batch_size), "--steps", "3", "--device", args.device, *extra]
        with rec.row(" ".join([method, f"{resolution}px", f"b{batch_size}", *extra[1::2]])) as row, torch.enable_grad():
            result = training_memory.measure(training_memory.parse_args(flags))
            row["peak_gib"] = result["accelerator_peak_gib"]
            row["s_per_step"] = result["seconds_per_step"]
            row["host_ema_gib"] = result["host_gib"]["ema"]
            row["trained_M"] = result["settings"]["trained_parameters"] / 1e6
            row["optimizer"] = result["settings"]["optimizer"]
        free_memory(args.device)


CHECK_FUNCTIONS = dict(
    parity=check_parity,
    training=check_training,
    attention=check_attention,
    offload=check_offload,
    forward_speed=check_forward_speed,
    official_sampling=check_official_sampling,
    cache_sampling=check_cache_sampling,
    compile=check_compile,
)


# ---------------------------------------------------------------------------------------------------------------------
# Running the checks (one process each) and writing the report.


def run_child(args) -> None:
    """Runs one check in this process; the parent reads `--_result`."""
    rec = Recorder(args._result)
    rec.flush()
    try:
        with torch.no_grad():
            CHECK_FUNCTIONS[args._check](args, rec)
        rec.data["status"] = "ok"
    except Skipped as reason:
        rec.data["status"] = f"skipped: {reason}"
    except Exception as error:
        rec.data["status"] = "error"
        rec.data["error"] = f"{type(error).__name__}: {error}"[:2000]
        traceback.print_exc()
    rec.flush()


def run_check(name: str, argv: list[str], limit: float, log_path: str) -> dict:
    """The check in a subprocess of its own session, killed (with its compile workers) after `limit` seconds."""
    fd, result_path = tempfile.mkstemp(prefix=f"gpu_check_{name}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--_check", name, "--_result", result_path]
    start = time.monotonic()
    failure = None
    with open(log_path, "a") as log:
        log.write(f"\n===== {name} (time limit {limit:.0f} s) =====\n")
        log.flush()
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = process.wait(timeout=limit)
            if returncode != 0:
                failure = f"crashed: exit code {returncode}" if returncode > 0 else f"crashed: signal {-returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            failure = f"timeout after {limit:.0f} s"
            log.write(f"\n===== {name}: killed at its time limit ({limit:.0f} s) =====\n")
    try:
        with open(result_path) as f:
            result = json.load(f)
    except (OSError, ValueError):
        result = {"status": "running", "rows": {}}
    finally:
        for path in (result_path, result_path + ".tmp"):
            if os.path.exists(path):
                os.remove(path)
    if failure:
        result["status"] = failure
        for row in result["rows"].values():
            if row.get("status") == "running":
                row["status"] = "interrupted"
    result["seconds"] = round(time.monotonic() - start, 1)
    return result


def environment(argv: list[str]) -> dict:
    env = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        command=" ".join(["python", "benchmarks/gpu_checks.py", *argv]),
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        diffusers=diffusers.__version__,
        gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        cpus=os.cpu_count(),
    )
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        env["git_commit"] = commit.stdout.strip() or None
    except OSError:
        env["git_commit"] = None
    return env


def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


def markdown(report: dict) -> str:
    env = report["env"]
    lines = ["# PixNerd GPU checks", ""]
    lines.append(", ".join(f"{key} {value}" for key, value in env.items() if key != "command" and value is not None))
    lines += ["", f"`{env['command']}`", ""]
    for index, (name, result) in enumerate(report["checks"].items(), 1):
        seconds = f", {result['seconds']} s" if "seconds" in result else ""
        lines += [f"## {index}. {name}: {result['status']}{seconds}", "", TITLES[name], ""]
        if result.get("error"):
            lines += [f"Error: `{format_value(result['error'])}`", ""]
        rows = result.get("rows", {})
        if not rows:
            continue
        columns = []
        for values in rows.values():
            columns += [key for key in values if key not in columns and key != "error"]
        if any("error" in values for values in rows.values()):
            columns.append("error")
        lines.append("| " + " | ".join(["row", *columns]) + " |")
        lines.append("|" + " --- |" * (len(columns) + 1))
        for row_name, values in rows.items():
            lines.append("| " + " | ".join([row_name] + [format_value(values.get(c)) for c in columns]) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, output_dir: str) -> str:
    with open(os.path.join(output_dir, "gpu_checks.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    text = markdown(report)
    with open(os.path.join(output_dir, "gpu_checks.md"), "w") as f:
        f.write(text + "\n")
    return text


def parse_timeouts(items: list[str], smoke: bool) -> dict:
    timeouts = {name: 600.0 for name in CHECKS} if smoke else {k: float(v) for k, v in TIMEOUTS.items()}
    for item in items or []:
        name, sep, seconds = item.partition("=")
        if not sep or name not in timeouts:
            raise SystemExit(f"--timeouts: {item!r} is not CHECK=SECONDS with a check of {CHECKS}.")
        timeouts[name] = float(seconds)
    return timeouts


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=os.environ.get("OUT") or os.path.join("outputs", "gpu_checks"))
    parser.add_argument("--checks", nargs="+", default=CHECKS, choices=CHECKS, help="Which checks, in this order.")
    parser.add_argument("--official_repo", default=None, help="A checkout of github MCG-NJU/PixNerd.")
    parser.add_argument("--smoke", action="store_true", help="Tiny models and steps: tests the script (on CPU too).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--model", default=None, help="The class-conditional preset [PixNerd-XL/16].")
    parser.add_argument("--t2i_model", default=None, help="The text-to-image preset for parity [PixNerd-XXL/16-T2I].")
    parser.add_argument("--resolution", type=int, default=None, help="Image side of --model [its sample_size].")
    parser.add_argument("--t2i_resolution", type=int, default=None, help="Image side of --t2i_model [sample_size].")
    parser.add_argument("--batch_size", type=int, default=None, help="Forward and offload batch [4].")
    parser.add_argument("--forward_batch_sizes", type=int, nargs="+", default=None, help="forward_speed [4 1].")
    parser.add_argument("--repeats", type=int, default=None, help="Timed forwards; the minimum counts [10].")
    parser.add_argument("--attention_backends", nargs="+", default=None, help="[all but Hub, NPU and XLA ones]")
    parser.add_argument("--offload_steps", type=int, default=None, help="Sampling steps of the offload check [4].")
    parser.add_argument("--sampling_steps", type=int, default=None, help="Steps of the sampling checks [50].")
    parser.add_argument("--sampling_batch_size", type=int, default=None, help="[--batch_size]")
    parser.add_argument("--sampling_repeats", type=int, default=None, help="Timed samplings per variant [3].")
    parser.add_argument(
        "--official_sampling_config", default=None, choices=sorted(official_sampling.CONFIGS), help="[PixNerd-XL/16]"
    )
    parser.add_argument(
        "--cache_variants",
        nargs="+",
        default=["cache=first_block:threshold=0.2", "cache=taylorseer:cache_interval=3"],
        help="benchmark_sampling.py variants, each timed against none.",
    )
    parser.add_argument("--compile_backend", default=None, help="[inductor; eager for --smoke on the CPU]")
    parser.add_argument("--time_budget", type=float, default=None, help="Seconds for all checks [420].")
    parser.add_argument("--timeouts", nargs="+", default=None, metavar="CHECK=SECONDS", help=f"Defaults: {TIMEOUTS}")
    parser.add_argument("--_check", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(input_args)
    if args.smoke:
        PIXNERD_PRESETS.update(SMOKE_PRESETS)  # in this process only: the checks (and benchmarks) build presets
    if args.smoke and args.compile_backend is None and torch.device(args.device).type == "cpu":
        args.compile_backend = "eager"  # inductor's C++ builds take minutes on a CPU
    for key, value in (SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args._check:
        return run_child(args)
    if torch.device(args.device).type != "cuda" and not args.smoke:
        print(f"Warning: no CUDA; the full sizes on {args.device} take far longer than the time limits.", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    log_path = os.path.join(args.output_dir, "gpu_checks.log")
    open(log_path, "w").close()
    timeouts = parse_timeouts(args.timeouts, args.smoke)
    report = dict(env=environment(argv), args={k: v for k, v in vars(args).items() if not k.startswith("_")})
    report["checks"] = {}
    start = time.monotonic()
    for name in args.checks:
        left = args.time_budget - (time.monotonic() - start)
        limit = min(timeouts[name], left)
        if limit < 20:
            report["checks"][name] = {"status": f"skipped: time budget ({args.time_budget:.0f} s) spent", "rows": {}}
        elif name == "official_sampling" and not args.official_repo:  # known here: spare a process start
            report["checks"][name] = {"status": "skipped: needs --official_repo", "rows": {}}
        else:
            print(f"[{time.monotonic() - start:6.1f} s] {name} (limit {limit:.0f} s) ...", flush=True)
            report["checks"][name] = dict(run_check(name, argv, limit, log_path), time_limit_s=round(limit))
            print(f"[{time.monotonic() - start:6.1f} s] {name}: {report['checks'][name]['status']}", flush=True)
        write_report(report, args.output_dir)  # after every check: a run stopped from outside keeps what it has
    report["total_seconds"] = round(time.monotonic() - start, 1)
    text = write_report(report, args.output_dir)
    print(f"\n{text}\nTotal {report['total_seconds']} s; written to {os.path.abspath(args.output_dir)}", flush=True)
    return report


if __name__ == "__main__":
    main()
