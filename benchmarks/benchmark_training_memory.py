"""Peak accelerator memory and time of real training steps (docs/training.md#memory).

    python benchmarks/benchmark_training_memory.py --preset PixNerd-XXL/16-T2I --method lora --resolution 256 \
        --batch_size 1 [--optimizer adamw8bit] [--no_gradient_checkpointing] [--ema_device accelerator] [--json FILE]

`--method distill` is LoRA few-step distillation (`train_pixnerd_t2i.py --distill --use_lora`): its training step is
the LoRA step (the teacher's noise and the sampler's sigmas change no shape), and before it the base model samples
the teacher images, guided (the batch doubled) and without gradients, `--teacher_batch_size` at a time. Both phases
are measured and the larger peak reported (`teacher_peak_gib`, `training_peak_gib`).

Builds the model of `--preset` with random weights (the text-to-image one sees random prompt embeddings of the
preset's text width, 2048 for Qwen3-1.7B, as with `--precompute_text_embeddings`: Qwen3 is not loaded), sets it up
as the training scripts do (the same package functions: LoRA adapters, bfloat16 weights for `adamw_bf16`, the
optimizer, the EMA, REPA with a DINOv2-B-shaped random encoder) and runs `--steps` optimizer steps under autocast.

What it reports is measured, not computed: on CUDA `torch.cuda.max_memory_allocated`; elsewhere torch's
`MemTracker` (torch.distributed._tools.mem_tracker), which follows every tensor storage created or registered
(parameters, gradients, optimizer state, activations, temporaries) and keeps the peak. Tensors that would not live
on the accelerator are left out of that peak: the EMA with `--ema_device cpu` (its size is reported as host
memory), the text encoder (never loaded). On CPU the torchao optimizers run eagerly (their per-parameter
`torch.compile` cannot run under a dispatch mode), which can only over-count their temporaries.

Defaults are the documented memory-saving settings: gradient checkpointing, bf16 autocast, for full fine-tuning
8-bit AdamW with the EMA on the CPU; for LoRA (rank 32, the script's target modules) AdamW on the float32 adapters,
a bfloat16 base, no EMA, no REPA. JSON keys: `accelerator_peak_gib`, `seconds_per_step`, `breakdown_gib`,
`host_gib`, `settings`.
"""

import argparse
import contextlib
import functools
import json
import sys
import time
import weakref
from argparse import Namespace

import torch
import torch.utils._pytree as pytree
from torch.distributed._tools.common_utils import get_untyped_storages
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_pixnerd import PIXNERD_PRESETS, PixNerdTransformer2DModel
from diffusers_pixnerd.training import (
    OPTIMIZERS,
    PixNerdTrainingModule,
    REPAProjector,
    add_lora_adapters,
    create_ema,
    create_optimizer,
    trained_weights_dtype,
    update_ema,
)
from diffusers_pixnerd.training.cli import add_switch

GIB = 2**30
# The script's default LoRA targets (examples/train_pixnerd_t2i.py LORA_TARGET_MODULES;
# tests/examples/test_benchmark_training_memory.py checks).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "proj_in", "proj_out", "param_generator"]
DINOV2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=14)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="PixNerd-XXL/16-T2I", choices=sorted(PIXNERD_PRESETS))
    parser.add_argument("--config_json", default=None, help="Model arguments on top of the preset (tests: a tiny one).")
    parser.add_argument("--method", choices=("lora", "full", "distill"), default="lora")
    parser.add_argument("--teacher_batch_size", type=int, default=1, help="distill: images per teacher call.")
    parser.add_argument("--teacher_steps", type=int, default=2, help="distill: guided sampling steps measured.")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="Optimizer steps measured for memory.")
    parser.add_argument("--timing_steps", type=int, default=1, help="CPU: steps timed afterwards, without the tracker.")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="Default: adamw8bit full, adamw LoRA.")
    add_switch(parser, "gradient_checkpointing", True, "Gradient checkpointing of the DiT blocks (default: on).")
    parser.add_argument("--ema_device", choices=("accelerator", "cpu", "none"), default=None)
    add_switch(parser, "use_repa", None, "REPA with a DINOv2-B-sized encoder (default: on for full, off for LoRA).")
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--mixed_precision", choices=("no", "bf16"), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="Also write the result here.")
    args = parser.parse_args(argv)
    full = args.method == "full"
    args.optimizer = args.optimizer or ("adamw8bit" if full else "adamw")
    args.ema_device = args.ema_device or ("cpu" if full else "none")
    args.use_repa = full if args.use_repa is None else args.use_repa
    return args


def build(args, device: str):
    """The training module, its optimizer and EMA (or None), a function making a random batch and the frozen modules
    that also sit on `device` (the REPA encoder), set up as the training scripts do. Also used by
    benchmarks/gpu_checks.py."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = {**PIXNERD_PRESETS[args.preset], "sample_size": args.resolution}
    config.update(json.loads(args.config_json or "{}"))
    transformer = PixNerdTransformer2DModel(**config)
    autocast_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    if args.method in ("lora", "distill"):
        add_lora_adapters(transformer, args.lora_rank, target_modules=LORA_TARGETS, base_dtype=autocast_dtype)
    else:
        transformer.to(trained_weights_dtype(args.optimizer))
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    encoder = projector = None
    if args.use_repa:
        encoder = Dinov2Model(Dinov2Config(**DINOV2_BASE)).eval().requires_grad_(False).to(device, autocast_dtype)
        hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        projector = REPAProjector(hidden, encoder.config.hidden_size).to(trained_weights_dtype(args.optimizer))
    text = config.get("text_embed_dim")
    null = torch.zeros(1, config["text_max_length"], text) if text else None
    module = PixNerdTrainingModule(transformer, projector, align_layer=min(6, config["num_layers"]),
                                   null_encoder_hidden_states=null).to(device)
    module.train()
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer_args = Namespace(optimizer=args.optimizer, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0,
                               adam_epsilon=1e-8)
    optimizer = create_optimizer(optimizer_args, parameters, 1.0 if args.optimizer == "prodigy" else 1e-5)
    ema = None
    if args.ema_device != "none":
        ema_parameters = [p for p in transformer.parameters() if p.requires_grad]
        ema = create_ema(ema_parameters, 0.9999, device="cpu" if args.ema_device == "cpu" else device)

    def make_batch(step: int) -> dict:
        generator = torch.Generator().manual_seed(step)
        size = (args.batch_size, 3, args.resolution, args.resolution)
        batch = {
            "pixels": torch.rand(size, generator=generator) * 2 - 1,
            "noise": torch.randn(size, generator=generator),
            "sigmas": torch.rand(args.batch_size, generator=generator),
            "drop_mask": torch.zeros(args.batch_size, dtype=torch.bool),
        }
        if text:
            batch["encoder_hidden_states"] = torch.randn(args.batch_size, config["text_max_length"], text,
                                                         generator=generator).to(autocast_dtype)
        else:
            batch["class_labels"] = torch.randint(0, config["num_classes"], (args.batch_size,), generator=generator)
        batch = {k: v.to(device) for k, v in batch.items()}
        if encoder is not None:
            from diffusers_pixnerd.training import repa_target_features

            grid = transformer.token_grid(args.resolution, args.resolution)[:2]
            with torch.autocast(torch.device(device).type, dtype=autocast_dtype):
                batch["repa_features"] = repa_target_features(encoder, batch["pixels"], grid)
        return batch

    return module, optimizer, ema, make_batch, [encoder] if encoder is not None else []


@torch.no_grad()
def teacher_steps(args, transformer, device: str) -> None:
    """What the teacher phase of a distillation run holds on the accelerator: `--teacher_steps` guided sampling steps
    of the base model (adapters off) on `[uncond, cond]`, `--teacher_batch_size` images, as the pipeline runs them."""
    config = transformer.config
    autocast_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    generator = torch.Generator().manual_seed(0)
    size = (args.teacher_batch_size, 3, args.resolution, args.resolution)
    latents = torch.randn(size, generator=generator).to(device)
    text = torch.randn(2 * size[0], config.text_max_length, config.text_embed_dim, generator=generator)
    text = text.to(device, autocast_dtype)
    transformer.eval()
    transformer.disable_adapters()  # the teacher: the base weights
    try:
        for step in range(args.teacher_steps):
            sigma = 1.0 - step / max(args.teacher_steps, 1)
            timestep = torch.full((2 * size[0],), sigma * 1000, device=device)
            with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=args.mixed_precision != "no"):
                velocity = transformer(latents.to(autocast_dtype).repeat(2, 1, 1, 1), timestep,
                                       encoder_hidden_states=text).sample.float()
            uncond, cond = velocity.chunk(2)
            latents = latents - (uncond + 4.0 * (cond - uncond)) / args.teacher_steps
            del velocity, uncond, cond
    finally:
        transformer.enable_adapters()
    transformer.train()
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_steps(args, module, optimizer, ema, make_batch, device: str, tracker=None) -> list[float]:
    """`args.steps` optimizer steps (forward, backward, clipping, step, EMA); returns the seconds of each."""
    trained = [p for p in module.parameters() if p.requires_grad]
    ema_parameters = [p for p in module.transformer.parameters() if p.requires_grad]
    autocast_dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        batch = make_batch(step)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=args.mixed_precision != "no"):
            loss = module(**batch)["loss"]
        loss.backward()
        if tracker is not None:
            tracker.label((p.grad for p in trained), "gradients")
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        if tracker is not None:
            tracker.label(pytree.tree_leaves(optimizer.state_dict()["state"]), "optimizer")
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, ema_parameters)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del batch, loss
    return times


class PeakMemoryTracker(TorchDispatchMode):
    """The live bytes of every tensor storage created while it is active (each op's outputs, gradients included) or
    registered with `track`, and their peak. `label` names storages (weights, gradients, ...) for the breakdown of
    the peak; the rest are activations and temporaries. A storage counts until it is freed (a weak reference)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[int, int, weakref.ref]] = {}  # storage address -> (serial, bytes, weak reference)
        self.labels: dict[int, str] = {}  # serial -> label (serials are never reused, addresses are)
        self.serial = self.current = self.peak = 0
        self.at_peak: dict[int, int] = {}  # serial -> bytes, the storages live at the peak
        self.excluded: set[int] = set()  # addresses of storages that live elsewhere (host memory)

    def exclude(self, tensors):
        """Never counts these (e.g. the EMA on the CPU), even when an in-place op returns them."""
        self.excluded.update(storage._cdata for t in tensors for storage in get_untyped_storages(t))

    def track(self, tensors, label: str | None = None):
        for tensor in tensors:
            for storage in get_untyped_storages(tensor):
                key, nbytes = storage._cdata, storage.nbytes()
                if key in self.excluded:
                    continue
                if key not in self.live and nbytes:
                    self.serial += 1
                    self.live[key] = (self.serial, nbytes, weakref.ref(storage, functools.partial(self._freed, key)))
                    self.current += nbytes
                    if self.current > self.peak:
                        self.peak = self.current
                        self.at_peak = {serial: size for serial, size, _ in self.live.values()}
                if label is not None and key in self.live:
                    self.labels[self.live[key][0]] = label

    def label(self, tensors, label: str):
        self.track([t for t in tensors if isinstance(t, torch.Tensor)], label)

    def _freed(self, key: int, _):
        _, nbytes, _ = self.live.pop(key, (0, 0, None))
        self.current -= nbytes

    def breakdown(self) -> dict[str, int]:
        """Bytes of the storages live at the peak, by label."""
        totals: dict[str, int] = {}
        for serial, nbytes in self.at_peak.items():
            label = self.labels.get(serial, "activations_and_temporaries")
            totals[label] = totals.get(label, 0) + nbytes
        return totals

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


@contextlib.contextmanager
def eager_torch_compile():
    """torchao's optimizers compile each parameter's update; a dispatch mode (the tracker) cannot run compiled code."""
    compile_ = torch.compile
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)
    try:
        yield
    finally:
        torch.compile = compile_


def teacher_peak(args, module, device: str) -> tuple[int, dict]:
    """The peak bytes (and breakdown) of the teacher phase of a distillation run."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        teacher_steps(args, module.transformer, device)
        return torch.cuda.max_memory_allocated(), {}
    tracker = PeakMemoryTracker()
    tracker.label(module.parameters(), "weights")
    tracker.label(module.buffers(), "weights")
    with tracker:
        teacher_steps(args, module.transformer, device)
    return tracker.peak, tracker.breakdown()


def measure(args) -> dict:
    device = args.device
    module, optimizer, ema, make_batch, frozen = build(args, device)
    ema_bytes = sum(p.numel() * p.element_size() for p in ema.shadow_params) if ema is not None else 0
    ema_on_accelerator = ema is not None and args.ema_device == "accelerator"
    teacher = teacher_peak(args, module, device) if args.method == "distill" else None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = train_steps(args, module, optimizer, ema, make_batch, device)
        peak, breakdown = torch.cuda.max_memory_allocated(), {}
    else:
        tracker = PeakMemoryTracker()
        tracker.label(module.parameters(), "weights")
        tracker.label(module.buffers(), "weights")
        for encoder in frozen:
            tracker.label([*encoder.parameters(), *encoder.buffers()], "frozen_encoders")
        if ema_on_accelerator:
            tracker.label(ema.shadow_params, "ema")
        elif ema is not None:
            tracker.exclude(ema.shadow_params)
        with eager_torch_compile(), tracker:
            train_steps(args, module, optimizer, ema, make_batch, device, tracker)
        peak, breakdown = tracker.peak, tracker.breakdown()
        # The time of steps without the tracker (which slows every op down); torchao optimizers compile here.
        times = train_steps(Namespace(**{**vars(args), "steps": args.timing_steps}), module, optimizer, ema,
                            make_batch, device)
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    phases = {}
    if teacher is not None:
        phases = {
            "teacher_peak_gib": teacher[0] / GIB,
            "teacher_breakdown_gib": {k: v / GIB for k, v in teacher[1].items()},
            "training_peak_gib": peak / GIB,
        }
        peak = max(peak, teacher[0])
    return {
        **phases,
        "accelerator_peak_gib": peak / GIB,
        "seconds_per_step": min(times) if times else None,
        "breakdown_gib": {k: v / GIB for k, v in breakdown.items()},
        "host_gib": {"ema": 0.0 if ema_on_accelerator else ema_bytes / GIB},
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "config_json")},
            "parameters": sum(p.numel() for p in module.transformer.parameters()),
            "trained_parameters": trained,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "torch_threads": torch.get_num_threads(),
        },
    }


def main(argv=None):
    args = parse_args(argv)
    result = measure(args)
    s = result["settings"]
    print(
        f"{args.preset} {args.method} {args.resolution}px batch {args.batch_size}, {args.optimizer}, "
        f"checkpointing {args.gradient_checkpointing}, EMA {args.ema_device}, REPA {args.use_repa}: "
        f"{s['trained_parameters'] / 1e6:.1f}M of {s['parameters'] / 1e6:.1f}M parameters trained"
    )
    print(f"  accelerator peak {result['accelerator_peak_gib']:.2f} GiB, {result['seconds_per_step'] or 0:.2f} s/step "
          f"on {s['device_name']}; host (EMA) {result['host_gib']['ema']:.2f} GiB")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["breakdown_gib"].items())))
    if args.method == "distill":
        print(f"  teacher phase (batch {args.teacher_batch_size}, guided) {result['teacher_peak_gib']:.2f} GiB: "
              + ", ".join(f"{k} {v:.2f}" for k, v in sorted(result["teacher_breakdown_gib"].items()))
              + f"; training phase {result['training_peak_gib']:.2f} GiB")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
