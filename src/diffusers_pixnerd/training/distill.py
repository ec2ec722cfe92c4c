# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""Few-step distillation of a text-to-image model (`--distill`): rectified-flow reflow with the guidance baked in.

The teacher is the base model with its saved sampler (guided, e.g. Adams-2, 50 steps, CFG 5 for the bundled model;
Adams-2, 25 steps, CFG 4, shift 3 for the official one). Before any adapter is added it samples
`--num_distill_samples` images for the prompts of `--distill_prompts_file`, image `i` from noise seeded by
`(seed, i)` alone (`teacher_noise`), into a captioned folder cached in the output folder (`generate_teacher_samples`:
each image written atomically, a killed run goes on where it stopped). The student (LoRA adapters on the same weights,
or the whole transformer) then learns, conditioned on the prompt alone, the straight velocity `noise - image` at the
points `(1 - sigma) * image + sigma * noise` of each pair's segment, at the sigmas its Euler sampler visits with the
step counts of `--distill_steps` (`sigma_choices`). That is the rectified-flow loss the trainers already use, on
pairs coupled by the teacher's ODE instead of independent noise: a straight path is followed exactly by Euler at any
step count, so one adapter serves 1 to 8 steps, with one transformer call per step and no guidance.

A distilled LoRA folder (or pipeline) carries the sampler it was made for (`FEW_STEP_SAMPLER_FILE`, written by
`save_few_step_sampler`); `load_pipeline(..., lora=...)` applies it and the pipelines warn when a call leaves it
(guidance on, another step count).
"""

import argparse
import hashlib
import json
import logging
import os

import torch

from ..loaders.lora_pipeline import FEW_STEP_SAMPLER_FILE, few_step_sampler_settings
from .validation import read_prompts_file

logger = logging.getLogger(__name__)

TEACHER_SAMPLES_PREFIX = "teacher_samples-"  # `--output_dir/teacher_samples-<digest>/`
DISTILL_FLAGS = (
    "distill_prompts_file",
    "num_distill_samples",
    "distill_steps",
    "distill_shift",
    "distill_num_inference_steps",
    "teacher_guidance_scale",
    "teacher_num_inference_steps",
    "teacher_batch_size",
)


def add_distill_arguments(parser: argparse.ArgumentParser):
    """The distillation flags (a group of their own)."""
    group = parser.add_argument_group("few-step distillation")
    group.add_argument(
        "--distill",
        action="store_true",
        help="Distill the model into a few-step sampler without guidance (LoRA with --use_lora, else the whole "
        "transformer): the base model's guided samples for --distill_prompts_file are the training data.",
    )
    group.add_argument(
        "--distill_prompts_file",
        type=str,
        default=None,
        help="With --distill: a text file of prompts (one a line) for the teacher samples; prompts like the ones "
        "users will write, kept apart from your evaluation prompts.",
    )
    group.add_argument(
        "--num_distill_samples",
        type=int,
        default=None,
        help="With --distill: teacher samples to generate, cycling through the prompts (default 1000).",
    )
    group.add_argument(
        "--distill_steps",
        type=int,
        nargs="+",
        default=None,
        help="With --distill: the step counts the student is trained for; it learns at the sigmas its Euler sampler "
        "visits with each (default: 1 2 4 8).",
    )
    group.add_argument(
        "--distill_shift",
        type=float,
        default=None,
        help="With --distill: the time shift of the student's sampler (default: the base model's sampler's).",
    )
    group.add_argument(
        "--distill_num_inference_steps",
        type=int,
        default=None,
        help="With --distill: the step count the saved sampler defaults to, one of --distill_steps (default 4, or the "
        "largest of --distill_steps below it).",
    )
    group.add_argument(
        "--teacher_guidance_scale",
        type=float,
        default=None,
        help="With --distill: the teacher's CFG scale (default: the base model's saved sampler).",
    )
    group.add_argument(
        "--teacher_num_inference_steps",
        type=int,
        default=None,
        help="With --distill: the teacher's steps (default: the base model's saved sampler).",
    )
    group.add_argument(
        "--teacher_batch_size", type=int, default=None, help="With --distill: images per teacher call (default 16)."
    )


def check_distill_arguments(args: argparse.Namespace):
    """Fills the defaults of a distillation run and refuses what it does not support, naming the flags."""
    if not args.distill:
        given = [f"`--{name}`" for name in DISTILL_FLAGS if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} configure a distillation run: pass `--distill` too.")
        return
    if args.distill_prompts_file is None:
        raise ValueError("`--distill` needs `--distill_prompts_file`: the prompts of the teacher samples.")
    read_prompts_file(args.distill_prompts_file, "--distill_prompts_file")
    if args.train_data_dir is not None or args.dataset_name is not None:
        raise ValueError(
            "`--distill` trains on the base model's own samples for `--distill_prompts_file`: drop "
            "`--train_data_dir` / `--dataset_name`."
        )
    refused = {
        "random_flip": "a flipped image no longer matches its noise",
        "aspect_ratio_buckets": "the teacher samples are square, at --resolution",
        "streaming": "the teacher samples are a local folder",
        "reg_data_dir": "the teacher samples already keep the base model's behaviour",
        "reg_prompts_file": "the teacher samples already keep the base model's behaviour",
        "use_repa": "the student learns the teacher's samples, not DINOv2's features",
    }
    for name, why in refused.items():
        if getattr(args, name, None):
            raise ValueError(f"`--{name}` does not go with `--distill`: {why}.")
    if args.condition_dropout != 0.0:
        raise ValueError(
            f"`--condition_dropout` {args.condition_dropout} with `--distill`: the student samples without guidance, "
            "so it never sees the null condition; leave the flag out (0 with --distill)."
        )
    args.num_distill_samples = 1000 if args.num_distill_samples is None else args.num_distill_samples
    args.distill_steps = [1, 2, 4, 8] if args.distill_steps is None else sorted(set(args.distill_steps))
    args.teacher_batch_size = 16 if args.teacher_batch_size is None else args.teacher_batch_size
    for name in ("num_distill_samples", "teacher_batch_size", "teacher_num_inference_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"`--{name}` must be a positive integer, got {value}.")
    if args.distill_steps[0] < 1:
        raise ValueError(f"`--distill_steps` must be positive integers, got {args.distill_steps}.")
    if args.distill_num_inference_steps is None:
        args.distill_num_inference_steps = max([n for n in args.distill_steps if n <= 4] or args.distill_steps[:1])
    if args.distill_num_inference_steps not in args.distill_steps:
        raise ValueError(
            f"`--distill_num_inference_steps` {args.distill_num_inference_steps} must be one of `--distill_steps` "
            f"{args.distill_steps}."
        )
    if args.distill_shift is not None and not args.distill_shift > 0:
        raise ValueError(f"`--distill_shift` must be a positive number, got {args.distill_shift}.")
    if args.teacher_guidance_scale is not None and not args.teacher_guidance_scale >= 0:
        raise ValueError(f"`--teacher_guidance_scale` must be >= 0, got {args.teacher_guidance_scale}.")


def check_distill_model(args: argparse.Namespace):
    """Distillation needs the text-to-image variant (the teacher samples come from prompts): checked on the model's
    `model_index.json` (or official checkpoint) before it loads."""
    from ..pipelines import PixNerdT2IPipeline, pipeline_class

    name = args.pretrained_model_name_or_path
    found = pipeline_class(name, revision=args.revision, cache_dir=args.cache_dir)
    if found is not PixNerdT2IPipeline:
        raise ValueError(
            f"`--distill`: {name!r} is a {found.__name__} (class-conditional); distillation here is for "
            "text-to-image models, whose teacher samples come from `--distill_prompts_file`."
        )


# ------------------------------------------------------------------------------------------------- the two samplers


def teacher_settings(args: argparse.Namespace, scheduler) -> dict:
    """The teacher's sampling: the base model's saved sampler, with `--teacher_*` on top."""
    config = scheduler.config
    return {
        "num_inference_steps": args.teacher_num_inference_steps or config.get("num_inference_steps", 50),
        "guidance_scale": (
            config.get("guidance_scale", 4.0) if args.teacher_guidance_scale is None else args.teacher_guidance_scale
        ),
        "guidance_interval": (config.get("guidance_interval_min", 0.0), config.get("guidance_interval_max", 1.0)),
        "solver_order": config.get("solver_order", 2),
        "shift": config.get("shift", 1.0),
    }


def few_step_sampler(args: argparse.Namespace, scheduler) -> dict:
    """The student's sampler: Euler (one call per step, no guidance) at the base sampler's shift or `--distill_shift`,
    defaulting to `--distill_num_inference_steps`; `distilled_steps` are the step counts it was trained for."""
    return {
        "solver_order": 1,
        "shift": scheduler.config.get("shift", 1.0) if args.distill_shift is None else args.distill_shift,
        "num_inference_steps": args.distill_num_inference_steps,
        "guidance_scale": 1.0,
        "distilled_steps": list(args.distill_steps),
    }


def few_step_scheduler(scheduler, sampler: dict):
    """A copy of `scheduler` (a `PixNerdFlowMatchScheduler`) set to the few-step `sampler`."""
    settings = {k: v for k, v in sampler.items() if k != "distilled_steps"}
    return type(scheduler).from_config(scheduler.config, **settings)


def sigma_choices(scheduler, steps: list[int]) -> torch.Tensor:
    """The sigmas at which the Euler sampler of `scheduler` calls the model with each step count of `steps`, all in
    one tensor (a sigma shared by several step counts, such as 1.0, appears once for each)."""
    sigmas = []
    for num_steps in steps:
        scheduler.set_timesteps(num_steps)
        sigmas.append(scheduler.sigmas[:-1].float().cpu())
    return torch.cat(sigmas)


def save_few_step_sampler(folder: str, sampler: dict, teacher: dict):
    """Writes the sampler a distilled model was made for (and the teacher's settings, for the record)."""
    with open(os.path.join(folder, FEW_STEP_SAMPLER_FILE), "w", encoding="utf-8") as f:
        json.dump({**sampler, "teacher": teacher}, f, indent=2)
        f.write("\n")


# --------------------------------------------------------------------------------------------- the teacher samples


def teacher_noise(noise_seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of teacher samples: for each seed a `torch.randn(shape)` from a CPU generator seeded with it (what
    `generate_teacher_samples` gave the teacher)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in noise_seeds])


def teacher_samples_folder(output_dir: str, key) -> str:
    """`output_dir/teacher_samples-<digest>`: the digest covers what the samples depend on (`key`: the base model,
    the prompts, their number, the size, the seed, the teacher's sampler), so changed settings never reuse stale
    samples."""
    digest = hashlib.sha256(json.dumps(key, default=str, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(output_dir, f"{TEACHER_SAMPLES_PREFIX}{digest}")


def read_metadata_lines(path: str) -> list[str]:
    """The complete lines of a metadata file being written (a line cut by a kill is dropped, and cut off the file)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = [line for line in text.split("\n")[:-1] if line.strip()]
    if not text.endswith("\n"):
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
    return lines


def generate_teacher_samples(
    accelerator,
    pipeline,
    encode,
    prompts: list[str],
    num_samples: int,
    folder: str,
    resolution: int,
    seed: int,
    teacher: dict,
    batch_size: int = 16,
) -> str:
    """Samples `num_samples` images with the base `pipeline` (the `teacher` settings) for the `prompts` (image `i`
    for prompt `i % len`, from the noise of seed `seed * 1_000_003 + i`) into the captioned `folder` (PNGs and
    `metadata.jsonl` with `text` and `noise_seed`). The processes share the images (process `r` of `n` samples those
    with `i % n == r`, each into `folder.tmp`, an image before its line in the process's own metadata shard); the main
    process merges the shards and renames the folder when all are complete. A killed run leaves the images it
    finished, which the next run keeps (with any number of processes). `encode` turns prompts into embeddings.
    Returns `folder`."""
    from tqdm.auto import tqdm

    if os.path.isdir(folder):
        if accelerator.is_main_process:
            logger.info("Reusing the teacher samples in %s", folder)
        return folder
    temporary = folder + ".tmp"
    rank, world = accelerator.process_index, accelerator.num_processes
    os.makedirs(temporary, exist_ok=True)
    accelerator.wait_for_everyone()  # every process sees the folder, and its shards as they were before this run
    shards = sorted(name for name in os.listdir(temporary) if name.startswith("metadata-"))
    done = {
        json.loads(line)["index"] for name in shards for line in read_metadata_lines(os.path.join(temporary, name))
    }
    mine = [i for i in range(rank, num_samples, world) if i not in done]
    if accelerator.is_main_process:
        logger.info(
            "Generating %d teacher samples with the base model into %s%s",
            num_samples - len(done),
            folder,
            f" ({len(done)} there from a stopped run)" if done else "",
        )
    accelerator.wait_for_everyone()  # all have read the shards before any writes to them
    device = accelerator.device
    pipeline.set_progress_bar_config(disable=True)
    null = encode([""])
    sampling = {k: teacher[k] for k in ("num_inference_steps", "guidance_scale", "guidance_interval")}
    shard = os.path.join(temporary, f"metadata-{rank:05d}.jsonl")
    with (
        open(shard, "a", encoding="utf-8") as metadata,
        tqdm(total=len(mine), desc="teacher samples", disable=not accelerator.is_main_process) as progress,
    ):
        for start in range(0, len(mine), batch_size):
            indices = mine[start : start + batch_size]
            captions = [prompts[i % len(prompts)] for i in indices]
            noise_seeds = [seed * 1_000_003 + i for i in indices]
            latents = teacher_noise(noise_seeds, (3, resolution, resolution))
            with torch.no_grad(), accelerator.autocast():
                images = pipeline(
                    prompt_embeds=encode(captions),
                    negative_prompt_embeds=null.expand(len(captions), -1, -1),
                    latents=latents.to(device),
                    **sampling,
                ).images
            for i, image, caption, noise_seed in zip(indices, images, captions, noise_seeds):
                name = f"{i:06d}.png"
                image.save(os.path.join(temporary, name + ".tmp"), format="PNG")
                os.replace(os.path.join(temporary, name + ".tmp"), os.path.join(temporary, name))
                row = {"index": i, "file_name": name, "text": caption, "noise_seed": noise_seed}
                metadata.write(json.dumps(row) + "\n")
            metadata.flush()
            progress.update(len(indices))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        names = sorted(name for name in os.listdir(temporary) if name.startswith("metadata-"))
        rows = {}
        for name in names:
            for line in read_metadata_lines(os.path.join(temporary, name)):
                row = json.loads(line)
                rows[row["index"]] = row
        if sorted(rows) != list(range(num_samples)):
            raise RuntimeError(f"{temporary}: {num_samples - len(rows)} teacher samples are missing after generation.")
        with open(os.path.join(temporary, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.write("".join(json.dumps(rows[i]) + "\n" for i in range(num_samples)))
        for name in names:
            os.remove(os.path.join(temporary, name))
        os.replace(temporary, folder)
    accelerator.wait_for_everyone()
    return folder


def load_teacher_samples(folder: str):
    """The teacher samples of `folder` as a `datasets` dataset: `image` (undecoded), `caption` and `noise_seed`."""
    import datasets

    with open(os.path.join(folder, "metadata.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    features = datasets.Features(
        {
            "image": datasets.Image(decode=False),
            "caption": datasets.Value("string"),
            "noise_seed": datasets.Value("int64"),
        }
    )
    data = {
        "image": [os.path.join(folder, row["file_name"]) for row in rows],
        "caption": [row["text"] for row in rows],
        "noise_seed": [row["noise_seed"] for row in rows],
    }
    return datasets.Dataset.from_dict(data, features=features)


def prepare_teacher_samples(accelerator, args: argparse.Namespace, transformer, scheduler, encode) -> str:
    """The folder of the run's teacher samples, generated by the base `transformer` (before any adapter is added)
    with its `scheduler` set to the teacher's settings, or reused."""
    from ..pipelines import PixNerdT2IPipeline

    prompts = read_prompts_file(args.distill_prompts_file, "--distill_prompts_file")
    teacher = teacher_settings(args, scheduler)
    key = [args.pretrained_model_name_or_path, prompts, args.num_distill_samples, args.resolution, args.seed, teacher]
    folder = teacher_samples_folder(args.output_dir, key)
    teacher_scheduler = type(scheduler).from_config(
        scheduler.config, solver_order=teacher["solver_order"], shift=teacher["shift"]
    )
    was_training = transformer.training
    transformer.to(accelerator.device).eval()
    pipeline = PixNerdT2IPipeline(transformer, teacher_scheduler)
    generate_teacher_samples(
        accelerator,
        pipeline,
        encode,
        prompts,
        args.num_distill_samples,
        folder,
        args.resolution,
        args.seed,
        teacher,
        args.teacher_batch_size,
    )
    transformer.train(was_training)
    return folder


__all__ = [
    "FEW_STEP_SAMPLER_FILE",
    "add_distill_arguments",
    "check_distill_arguments",
    "check_distill_model",
    "few_step_sampler",
    "few_step_sampler_settings",
    "few_step_scheduler",
    "generate_teacher_samples",
    "load_teacher_samples",
    "prepare_teacher_samples",
    "save_few_step_sampler",
    "sigma_choices",
    "teacher_noise",
    "teacher_settings",
]
