# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Validation images of a run: at step 0 (the baseline, before the first step), every `--validation_steps` and at the
end (the samples of the model card), for each prompt or class at each of `--validation_sizes`.

Each (prompt, size) pair is a job, rendered alone with a generator seeded by (seed, prompt number): an image does not
depend on the number of processes, and a prompt gets the same noise at every step (and the same seed at every size),
so the steps compare. The processes render their share of the jobs; the main one saves and logs them all.
"""

import dataclasses
import os
import shutil
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn

VALIDATION_DIR = "validation"
FINAL_FOLDER = "final"
BASELINE_STEP = 0


# ------------------------------------------------------------------------------------------------ flags and files


def read_prompts_file(path: str, flag: str) -> list[str]:
    """The non-empty lines of the text file `path` given with `flag`, one prompt a line."""
    if not os.path.isfile(path):
        raise ValueError(f"`{flag}` {path!r} is not a file.")
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(f"`{flag}` {path!r} has no prompt (one a line).")
    return prompts


def validation_prompts(prompts: list[str] | None, prompts_file: str | None, default: list[str]) -> list[str]:
    """The prompts of `--validation_prompts` or of `--validation_prompts_file` (one of them), else `default`."""
    if prompts is not None and prompts_file is not None:
        raise ValueError("Pass one of `--validation_prompts` and `--validation_prompts_file`, not both.")
    if prompts_file is not None:
        return read_prompts_file(prompts_file, "--validation_prompts_file")
    return list(default if prompts is None else prompts)


def parse_validation_sizes(values: list[str] | None) -> list[tuple[int, int]] | None:
    """`--validation_sizes` as (height, width) pairs: each value `N` (N x N) or `HxW` (height x width)."""
    if values is None:
        return None
    sizes = []
    for value in values:
        parts = str(value).lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"`--validation_sizes`: {value!r} is not a size; expected `N` (N x N pixels) or `HxW` (height x width "
                "in pixels), positive integers, e.g. `--validation_sizes 256 256x512`."
            )
        height, width = int(parts[0]), int(parts[-1])
        if (height, width) not in sizes:
            sizes.append((height, width))
    return sizes


def check_validation_sizes(args, multiple: int) -> list[tuple[int, int]]:
    """Sets `args.validation_sizes` to the (height, width) pairs to sample, by default the training `--resolution`
    (square), after checking that they are multiples of the model's `resolution_multiple` (the sizes its pipeline
    takes). Called once the model is known, before training."""
    sizes = args.validation_sizes or [(args.resolution, args.resolution)]
    flag = "--validation_sizes" if args.validation_sizes else "--resolution"
    wrong = [f"{h}x{w}" for h, w in sizes if h % multiple or w % multiple]
    if wrong:
        raise ValueError(
            f"`{flag}`: {', '.join(wrong)} (height x width) is not a size the model samples at; its height and width "
            f"must be multiples of {multiple} (the model's `resolution_multiple`)."
        )
    args.validation_sizes = sizes
    return sizes


# ----------------------------------------------------------------------------------------------------- rendering


def job_seed(seed: int, index: int) -> int:
    """The noise seed of prompt `index` (the same at every size and step)."""
    return (seed * 1_000_003 + index) % 2**63


def validation_jobs(num_prompts: int, sizes: list[tuple[int, int]]) -> list[tuple[int, tuple[int, int]]]:
    """(prompt number, (height, width)) of every image, size after size."""
    return [(index, size) for size in sizes for index in range(num_prompts)]


def render_validation(accelerator, pipeline, inputs: list[dict], sizes: list, seed: int, **call_kwargs) -> list:
    """Renders every (prompt, size) job, each process its share (jobs `rank`, `rank + processes`, ...), one image per
    pipeline call; `inputs[i]` are the pipeline arguments of prompt `i` (`prompt`, `class_labels`, `prompt_embeds`,
    ...). Returns the images (uint8 HWC arrays) in job order on the main process, `[]` on the others."""
    from accelerate.utils import gather_object

    jobs = validation_jobs(len(inputs), sizes)
    rank, world = accelerator.process_index, accelerator.num_processes
    rounds = -(-len(jobs) // world)
    rendered = []
    # Every process makes as many calls as the others (FSDP gathers the weights in each call, with all processes):
    # where the jobs do not divide evenly, the last ones render a job again and drop it.
    for position in range(rank, rounds * world, world):
        index, (height, width) = jobs[position % len(jobs)]
        generator = torch.Generator().manual_seed(job_seed(seed, index))
        image = pipeline(**inputs[index], height=height, width=width, generator=generator, **call_kwargs).images[0]
        if position < len(jobs):
            rendered.append((position, np.asarray(image)))
    if world > 1:
        rendered = gather_object(rendered)
    if not accelerator.is_main_process:
        return []
    return [image for _, image in sorted(rendered, key=lambda item: item[0])]


@contextmanager
def unsharded_root(model: nn.Module):
    """FSDP2: gathers the parameters of the root shard unit (the training module's own: embeddings, final layer, ...)
    for the block, for calls that bypass its forward, such as a pipeline calling the transformer. The wrapped blocks
    and the neural field gather theirs in their own forward. Any other model: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    # Before the first training step (the step-0 images) no forward has gone through the root yet: FSDP would take
    # the first block the pipeline calls for a root, and refuse the training forward after it. The root's first
    # forward does this initialisation (a no-op once done); torch has no public call for it.
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


# -------------------------------------------------------------------------------------------------- saving, logging


def validation_folder(output_dir: str, step: int, final: bool = False) -> str:
    """`validation/step-<step>/`, or `validation/final/` for the samples of the exported model."""
    return os.path.join(output_dir, VALIDATION_DIR, FINAL_FOLDER if final else f"step-{step}")


def size_name(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def image_file_name(index: int, caption: str, size: tuple[int, int], resolution: int | None) -> str:
    """`<prompt number>_<caption>.png` at the training resolution, `..._<H>x<W>.png` at other sizes."""
    slug = "".join(c if c.isalnum() else "_" for c in caption)[:40].strip("_")
    suffix = "" if size == (resolution, resolution) else f"_{size_name(size)}"
    return f"{index:02d}_{slug}{suffix}.png"


def save_validation(images: list, captions: list[str], sizes: list, folder: str, resolution: int | None) -> list[str]:
    """Saves the images of `render_validation` in `folder` (written aside, then put in place of an earlier one, so the
    folder holds one whole set); returns their paths."""
    import PIL.Image

    temporary = folder + ".tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    names = []
    for image, (index, size) in zip(images, validation_jobs(len(captions), sizes)):
        names.append(image_file_name(index, captions[index], size, resolution))
        PIL.Image.fromarray(image).save(os.path.join(temporary, names[-1]))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(temporary, folder)
    return [os.path.join(folder, name) for name in names]


def log_validation(accelerator, images: list, captions: list[str], sizes: list, step: int):
    """Logs the images to the trackers, one name per size: `validation/<H>x<W>` (TensorBoard: the row of that size's
    images; W&B: the images with their captions)."""
    jobs = validation_jobs(len(captions), sizes)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for size in sizes:
                row = np.stack([im for im, (_, s) in zip(images, jobs) if s == size])
                tracker.writer.add_images(f"{VALIDATION_DIR}/{size_name(size)}", row, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            logged = {f"{VALIDATION_DIR}/{size_name(size)}": [] for size in sizes}
            for image, (index, size) in zip(images, jobs):
                logged[f"{VALIDATION_DIR}/{size_name(size)}"].append(wandb.Image(image, caption=captions[index]))
            tracker.log(logged, step=step)


def baseline_images(sample_paths: list[str], output_dir: str) -> list[str]:
    """The step-0 images (`validation/step-0/`) of the same prompts and sizes as the final `sample_paths`, where they
    all exist."""
    folder = validation_folder(output_dir, BASELINE_STEP)
    paths = [os.path.join(folder, os.path.basename(p)) for p in sample_paths]
    return paths if paths and all(os.path.isfile(p) for p in paths) else []


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """`TrainingRun.validation_images`: every `steps` steps (`None`: only the final images), at `sizes` (`(height,
    width)` pairs; `None`: the training `resolution`), with the sampler's defaults unless `num_inference_steps` or
    `guidance_scale` are given."""

    steps: int | None
    sizes: list | None
    resolution: int
    num_inference_steps: int | None = None
    guidance_scale: float | None = None

    @classmethod
    def from_args(cls, args) -> "ValidationSettings":
        """From the `--validation_*` flags and `--resolution`."""
        return cls(
            args.validation_steps,
            args.validation_sizes,
            args.resolution,
            args.validation_num_inference_steps,
            args.validation_guidance_scale,
        )
