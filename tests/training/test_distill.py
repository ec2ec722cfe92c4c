"""Few-step distillation (`examples/train_pixnerd_t2i.py --distill`, `training/distill.py`): the teacher samples
(coupled to their noise, written atomically, resumed after a kill), the step (the teacher's noise, the sampler's
sigmas), a resumed run ending bit-identical, the distilled LoRA's sampler applied by `load_pipeline` and the warnings
when a call leaves it, stacking with another LoRA, and bad flags named. Tiny models, in-process runs."""

import json
import os
import shutil
import sys
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdFlowMatchScheduler, load_pipeline
from diffusers_pixnerd.loaders.lora_pipeline import FEW_STEP_SAMPLER_FILE
from diffusers_pixnerd.training.distill import (
    TEACHER_SAMPLES_PREFIX,
    generate_teacher_samples,
    sigma_choices,
    teacher_noise,
)

from ..helpers import DISTILL_PROMPTS as PROMPTS
from ..helpers import ROOT, T2I_SCRIPT, distill_args, t2i_args

sys.path.insert(0, os.path.join(ROOT, "examples"))
import train_pixnerd_t2i  # noqa: E402

LORA_FILE = "pytorch_lora_weights.safetensors"


TEACHER = {
    "num_inference_steps": 3,
    "guidance_scale": 4.0,
    "guidance_interval": (0.1, 1.0),
    "shift": 1,
    "solver_order": 2,
}


# ---------------------------------------------------------------------------------------------------- sigmas and noise


def test_the_student_learns_at_the_sigmas_its_euler_sampler_visits():
    scheduler = PixNerdFlowMatchScheduler(solver_order=1, shift=1.0)
    expected = [1.0, 1.0, 0.5, 1.0, 0.75, 0.5, 0.25]  # 1, 2 and 4 steps: sigma 1 once for each
    torch.testing.assert_close(sigma_choices(scheduler, [1, 2, 4]), torch.tensor(expected))
    shifted = sigma_choices(PixNerdFlowMatchScheduler(solver_order=1, shift=3.0), [2])
    torch.testing.assert_close(shifted, torch.tensor([1.0, 3 * 0.5 / (1 + 2 * 0.5)]))  # diffusers' time shift


class RecordingPipeline:
    """Stands in for the teacher: records each call's noise and settings; an image is the noise's sign pattern."""

    def __init__(self, fail_on_call=None):
        self.calls, self.fail_on_call = [], fail_on_call

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, prompt_embeds, negative_prompt_embeds, latents, **sampling):
        if len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt
        self.calls.append((latents.clone(), sampling))
        pixels = ((latents[:, 0] > 0).numpy() * 255).astype(np.uint8)
        images = [PIL.Image.fromarray(np.stack([p, p, p], -1)) for p in pixels]
        return type("Output", (), {"images": images})


class Process:
    """Stands in for the accelerator of process `rank` of `world` (the barriers are no-ops: run the processes one after
    the other, the main one last)."""

    device = torch.device("cpu")

    def __init__(self, rank=0, world=1):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0

    def wait_for_everyone(self):
        pass

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def read_teacher_folder(folder, metadata="metadata.jsonl"):
    rows = [json.loads(line) for line in open(os.path.join(folder, metadata))]
    return [
        (row["text"], row["noise_seed"], np.asarray(PIL.Image.open(os.path.join(folder, row["file_name"]))))
        for row in rows
    ]


def test_teacher_samples_are_coupled_to_their_noise_and_survive_a_kill(tmp_path):
    encode = lambda prompts: torch.zeros(len(prompts), 2, 4)  # noqa: E731
    folder = str(tmp_path / f"{TEACHER_SAMPLES_PREFIX}abc")
    teacher = RecordingPipeline(fail_on_call=1)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during the second batch
        generate_teacher_samples(Process(), teacher, encode, PROMPTS, 7, folder, 8, 3, TEACHER, batch_size=3)
    (shard,) = [name for name in os.listdir(folder + ".tmp") if name.startswith("metadata-")]
    assert len(read_teacher_folder(folder + ".tmp", shard)) == 3 and not os.path.exists(folder)
    resumed = RecordingPipeline()
    generate_teacher_samples(Process(), resumed, encode, PROMPTS, 7, folder, 8, 3, TEACHER, batch_size=3)
    assert len(resumed.calls) == 2  # only what was missing: 3 + 1 images
    assert resumed.calls[0][1] == {
        k: TEACHER[k] for k in ("num_inference_steps", "guidance_scale", "guidance_interval")
    }
    rows = read_teacher_folder(folder)
    assert [text for text, _, _ in rows] == [PROMPTS[i % 3] for i in range(7)]
    assert [seed for _, seed, _ in rows] == [3 * 1_000_003 + i for i in range(7)]
    # Each image came from the noise its seed gives again (what the training step uses), whatever the batching.
    for _, seed, image in rows:
        noise = teacher_noise(torch.tensor([seed]), (3, 8, 8))
        assert np.array_equal(image[..., 0], ((noise[0, 0] > 0).numpy() * 255).astype(np.uint8))
    uninterrupted = str(tmp_path / "other")
    generate_teacher_samples(Process(), RecordingPipeline(), encode, PROMPTS, 7, uninterrupted, 8, 3, TEACHER, 7)
    assert all(a[:2] == b[:2] and np.array_equal(a[2], b[2]) for a, b in zip(rows, read_teacher_folder(uninterrupted)))
    # Two processes share the images (each its own shard); the main one merges them: the same folder.
    shared = str(tmp_path / "shared")
    second, first = RecordingPipeline(), RecordingPipeline()
    generate_teacher_samples(Process(1, 2), second, encode, PROMPTS, 7, shared, 8, 3, TEACHER, batch_size=2)
    assert not os.path.exists(shared)  # not the main process: it leaves the merge to it
    generate_teacher_samples(Process(0, 2), first, encode, PROMPTS, 7, shared, 8, 3, TEACHER, batch_size=2)
    assert [len(latents) for latents, _ in second.calls] == [2, 1] and [len(x) for x, _ in first.calls] == [2, 2]
    assert all(a[:2] == b[:2] and np.array_equal(a[2], b[2]) for a, b in zip(rows, read_teacher_folder(shared)))
    # Complete: reused without a call.
    again = RecordingPipeline()
    generate_teacher_samples(Process(), again, encode, PROMPTS, 7, folder, 8, 3, TEACHER, batch_size=3)
    assert again.calls == []


# ---------------------------------------------------------------------------------------------------------- whole runs


def test_a_distillation_step_joins_each_teacher_sample_to_its_own_noise(assets, tmp_path, run_main, monkeypatch):
    from diffusers_pixnerd.training.objectives import PixNerdTrainingModule

    seen, forward = [], PixNerdTrainingModule.forward

    def spy(self, pixels, noise, sigmas, drop_mask, **kwargs):
        seen.append((pixels.clone(), noise.clone(), sigmas.clone(), drop_mask.clone()))
        return forward(self, pixels, noise, sigmas, drop_mask, **kwargs)

    monkeypatch.setattr(PixNerdTrainingModule, "forward", spy)
    out = tmp_path / "out"
    run_main(T2I_SCRIPT, distill_args(assets, tmp_path, out, "--max_train_steps", 3))
    (folder,) = out.glob(f"{TEACHER_SAMPLES_PREFIX}*")
    samples = {}
    for _, seed, image in read_teacher_folder(folder):
        samples[seed] = torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1
    allowed = sigma_choices(PixNerdFlowMatchScheduler(solver_order=1), [1, 2, 4])
    assert len(seen) == 3
    for pixels, noise, sigmas, drop_mask in seen:
        for row in range(len(pixels)):
            (seed,) = [s for s, image in samples.items() if torch.allclose(image, pixels[row], atol=1e-6)]
            torch.testing.assert_close(noise[row], teacher_noise(torch.tensor([seed]), pixels.shape[1:])[0])
        assert all(bool((allowed - s).abs().min() < 1e-6) for s in sigmas)
        assert not drop_mask.any()  # no null condition: the student samples without guidance


def test_a_resumed_distillation_ends_bit_identical_and_exports_a_few_step_lora(assets, tmp_path, run_main):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = distill_args(assets, tmp_path, full, "--max_train_steps", 4, "--checkpointing_steps", 2)
    run_main(T2I_SCRIPT, args)
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    for folder in full.glob(f"{TEACHER_SAMPLES_PREFIX}*"):  # the teacher samples travel with the output folder
        shutil.copytree(folder, resumed / folder.name)
    args[args.index("--output_dir") + 1] = resumed
    run_main(T2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    a, b = load_file(full / "checkpoint-4" / LORA_FILE), load_file(resumed / "checkpoint-4" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    # The export: the adapters, the sampler they were made for, a card that says how to call them.
    sampler = json.loads((full / FEW_STEP_SAMPLER_FILE).read_text())
    assert sampler["num_inference_steps"] == 4 and sampler["distilled_steps"] == [1, 2, 4]
    assert sampler["guidance_scale"] == 1.0 and sampler["solver_order"] == 1
    assert sampler["teacher"]["num_inference_steps"] == 3 and sampler["teacher"]["guidance_scale"] == 3.0
    # evaluate.py --checkpoint samples a checkpoint of the run with the run's few-step sampler.
    import evaluate

    pipe = load_pipeline(assets / "t2i_pipeline")
    evaluate.load_weights(pipe, evaluate.parse_args(["--model", "m", "--checkpoint", str(full / "checkpoint-2")]))
    assert (pipe.scheduler.config.num_inference_steps, pipe.scheduler.config.solver_order) == (4, 1)
    assert any("lora_A" in name for name, _ in pipe.transformer.named_parameters())
    card = (full / "README.md").read_text()
    assert "to sample in 4 steps (trained for 1, 2, 4 steps)" in card
    assert "num_inference_steps=4, guidance_scale=1.0" in card and "| `num_distill_samples` | `6` |" in card
    assert "timestep_sampling" not in card  # the distillation draws its own sigmas


def test_a_full_distillation_exports_a_pipeline_that_samples_in_few_steps(assets, tmp_path, run_main):
    out = tmp_path / "full"
    args = distill_args(assets, tmp_path, out, "--max_train_steps", 2)
    args.remove("--use_lora")
    run_main(T2I_SCRIPT, args)
    pipe = load_pipeline(out)  # the whole pipeline: its scheduler is the few-step sampler
    config = pipe.scheduler.config
    assert (config.num_inference_steps, config.guidance_scale, config.solver_order) == (4, 1.0, 1)
    assert json.loads((out / FEW_STEP_SAMPLER_FILE).read_text())["distilled_steps"] == [1, 2, 4]
    base = load_pipeline(assets / "t2i_pipeline")
    changed = [
        name
        for name, p in pipe.transformer.named_parameters()
        if not torch.equal(p, base.transformer.get_parameter(name))
    ]
    assert changed  # trained (with the EMA of a full run swapped in)


def test_load_pipeline_applies_the_few_step_sampler_and_calls_that_leave_it_warn(assets, tmp_path, run_main):
    out = tmp_path / "turbo"
    run_main(T2I_SCRIPT, distill_args(assets, tmp_path, out, "--max_train_steps", 2))
    base = load_pipeline(assets / "t2i_pipeline")
    pipe = load_pipeline(assets / "t2i_pipeline", lora=out)
    config = pipe.scheduler.config
    assert (config.num_inference_steps, config.guidance_scale, config.solver_order) == (4, 1.0, 1)
    assert base.scheduler.config.num_inference_steps == 2  # the base keeps its own sampler
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the settings it was made for: no warning
        images = pipe("a cat", generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert calls == [1, 1, 1, 1]  # 4 steps, one unguided call each
    # The same as asking the base pipeline with the LoRA for Euler, 4 steps, no guidance.
    base.load_lora_weights(out)
    base.scheduler = PixNerdFlowMatchScheduler.from_config(base.scheduler.config, solver_order=1)
    base.set_progress_bar_config(disable=True)
    expected = base(
        "a cat",
        num_inference_steps=4,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    with pytest.warns(UserWarning, match=r"baked in, to sample with `guidance_scale=1.0`; this call guides with 3.0"):
        pipe("a cat", guidance_scale=3.0, output_type="latent")
    with pytest.warns(UserWarning, match=r"trained for \[1, 2, 4\] steps; this call runs 3"):
        pipe("a cat", num_inference_steps=3, output_type="latent")
    # Stacked with another LoRA (a style; here the same weights without the sampler file): still the few-step
    # adapter's rules while it is active.
    os.makedirs(tmp_path / "style")
    shutil.copy(out / LORA_FILE, tmp_path / "style" / LORA_FILE)
    pipe.load_lora_weights(tmp_path / "style", adapter_name="style")
    assert set(pipe.few_step_adapters) == {"default_0"}
    pipe.set_adapters(["default_0", "style"], [1.0, 0.5])
    with pytest.warns(UserWarning, match="'default_0'.*this call guides with 2.0"):
        pipe("a cat", guidance_scale=2.0, output_type="latent")
    pipe.set_adapters(["style"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the plain LoRA active: no few-step rules
        pipe("a cat", guidance_scale=2.0, output_type="latent")


# ----------------------------------------------------------------------------------------------------------- bad flags


def parse(assets, tmp_path, *extra):
    return train_pixnerd_t2i.parse_args([str(a) for a in distill_args(assets, tmp_path, tmp_path / "out", *extra)])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--random_flip"], "`--random_flip` does not go with `--distill`: a flipped image no longer matches"),
        (["--train_data_dir", "{data}"], "trains on the base model's own samples .* drop `--train_data_dir`"),
        (["--condition_dropout", 0.1], "`--condition_dropout` 0.1 with `--distill`"),
        (["--distill_num_inference_steps", 3], r"`--distill_num_inference_steps` 3 must be one of `--distill_steps`"),
        (["--num_distill_samples", 0], "`--num_distill_samples` must be a positive integer"),
        (["--distill_shift", -1], "`--distill_shift` must be a positive number"),
        (["--use_repa"], "`--use_repa` does not go with `--distill`"),
    ],
)
def test_bad_distillation_flags_are_named(assets, tmp_path, flags, message):
    flags = [str(f).format(data=assets / "captions_txt") for f in flags]
    with pytest.raises(ValueError, match=message):
        parse(assets, tmp_path, *flags)


def test_distillation_flags_without_distill_and_a_missing_prompts_file_are_named(assets, tmp_path):
    args = [str(a) for a in t2i_args(assets, "captions_txt", tmp_path / "out", "--distill_steps", 4)]
    with pytest.raises(ValueError, match=r"`--distill_steps` configure a distillation run: pass `--distill` too"):
        train_pixnerd_t2i.parse_args(args)
    args = [a for a in distill_args(assets, tmp_path, tmp_path / "out")]
    at = args.index("--distill_prompts_file")
    del args[at : at + 2]
    with pytest.raises(ValueError, match="`--distill` needs `--distill_prompts_file`"):
        train_pixnerd_t2i.parse_args([str(a) for a in args])


def test_distilling_a_class_conditional_model_is_refused(assets, tmp_path, run_main):
    from diffusers_pixnerd import PixNerdPipeline, PixNerdTransformer2DModel
    from diffusers_pixnerd.testing_utils import TINY_C2I, randomize_

    PixNerdPipeline(
        transformer=randomize_(PixNerdTransformer2DModel(**TINY_C2I)), scheduler=PixNerdFlowMatchScheduler()
    ).save_pretrained(tmp_path / "c2i")
    args = distill_args(assets, tmp_path, tmp_path / "out")
    args[args.index("--pretrained_model_name_or_path") + 1] = tmp_path / "c2i"
    with pytest.raises(ValueError, match=r"`--distill`: .*c2i' is a PixNerdPipeline \(class-conditional\)"):
        run_main(T2I_SCRIPT, args)
