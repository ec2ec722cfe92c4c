"""Validation images of the training scripts (training/validation.py): the step-0 baseline, `--validation_sizes`
(non-square too), `--validation_prompts_file`, the images shared across processes, TensorBoard and W&B, the model card.
Tiny runs with the `assets` fixture of conftest.py (in this process where one process will do)."""

import importlib.util
import io
import os
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from ..helpers import C2I_SCRIPT, ROOT, T2I_SCRIPT, c2i_args, launch, t2i_args

sys.path.insert(0, os.path.join(ROOT, "examples"))
import train_pixnerd_c2i  # noqa: E402
import train_pixnerd_t2i  # noqa: E402

PROMPTS = ["a red square", "a blue circle", "green noise"]


T2I_SIZES = ["16", "24x16", "8"]  # the training resolution (16), a non-square size, a smaller square


C2I_RUN = ["--no_use_repa", "--no_use_ema", "--learning_rate", 1e-2, "--validation_sizes", "16", "8x12"]


def images_in(folder) -> dict[str, np.ndarray]:
    return {name: np.asarray(PIL.Image.open(folder / name)) for name in sorted(os.listdir(folder))}


T2I_RUN = ["--no_use_repa", "--no_use_ema", "--learning_rate", 1e-2, "--validation_sizes", *T2I_SIZES]


def main_in_process(script, args, hf_home):
    """`main(parse_args(args))` of a script in this process, as the `run_main` fixture of tests/conftest.py does, for a
    module-scoped fixture."""
    from accelerate.state import AcceleratorState, GradientState

    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(hf_home))
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            module.main(module.parse_args([str(a) for a in args]))
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            torch.set_num_threads(threads)


def without_prompts(args: list) -> list:
    """`t2i_args` without its `--validation_prompts "a cat"`."""
    i = args.index("--validation_prompts")
    return args[:i] + args[i + 2 :]


def prompts_file(folder, lines=PROMPTS):
    path = folder / "prompts.txt"
    path.write_text("\n".join([lines[0], "", *lines[1:]]) + "\n")  # a blank line, skipped
    return path


@pytest.fixture(scope="module")
def t2i_run(assets, tmp_path_factory):
    """One process, in this process: 3 prompts from a file at 3 sizes, validation every 2 steps, TensorBoard."""
    tmp_path = tmp_path_factory.mktemp("t2i")
    out = tmp_path / "out"
    args = without_prompts(t2i_args(assets, "captions_txt", out, *T2I_RUN))
    args += ["--validation_prompts_file", prompts_file(tmp_path), "--max_train_steps", 2, "--validation_steps", 2]
    main_in_process(T2I_SCRIPT, [*args, "--checkpointing_steps", 2, "--report_to", "tensorboard"], tmp_path / "hf")
    return out


T2I_NAMES = [
    f"{i:02d}_{prompt.replace(' ', '_')}{suffix}.png"
    for suffix in ("", "_24x16", "_8x8")
    for i, prompt in enumerate(PROMPTS)
]


def test_t2i_validates_at_step_0_every_n_steps_and_at_the_end(t2i_run):
    assert sorted(os.listdir(t2i_run / "validation")) == ["final", "step-0", "step-2"]
    baseline, final = images_in(t2i_run / "validation" / "step-0"), images_in(t2i_run / "validation" / "final")
    # The prompts of the file, in order, at every size (the training resolution unnamed).
    assert sorted(baseline) == sorted(final) == sorted(T2I_NAMES)
    assert all(np.array_equal(final[n], a) for n, a in images_in(t2i_run / "validation" / "step-2").items())
    # Training changed every image; the prompts differ from each other.
    for name in T2I_NAMES:
        assert np.abs(baseline[name].astype(int) - final[name]).max() > 10, name
    assert not np.array_equal(baseline["00_a_red_square.png"], baseline["01_a_blue_circle.png"])


@pytest.fixture(scope="module")
def c2i_run(assets, tmp_path_factory):
    """One process, in this process: the 3 classes at 2 sizes, validation every step."""
    tmp_path = tmp_path_factory.mktemp("c2i")
    args = c2i_args(assets, tmp_path / "out", *C2I_RUN, "--max_train_steps", 2, "--validation_steps", 1)
    main_in_process(C2I_SCRIPT, [*args, "--checkpointing_steps", 2], tmp_path / "hf")
    return tmp_path / "out", args


def test_validation_sizes_give_the_pixel_shapes(t2i_run, c2i_run):
    shapes = {name: image.shape for name, image in images_in(t2i_run / "validation" / "final").items()}
    assert shapes["00_a_red_square.png"] == (16, 16, 3)
    assert shapes["02_green_noise_24x16.png"] == (24, 16, 3)  # height x width
    assert shapes["01_a_blue_circle_8x8.png"] == (8, 8, 3)
    c2i = {name: image.shape for name, image in images_in(c2i_run[0] / "validation" / "step-0").items()}
    assert c2i == {
        "00_cat.png": (16, 16, 3),
        "01_dog.png": (16, 16, 3),
        "02_fish.png": (16, 16, 3),
        "00_cat_8x12.png": (8, 12, 3),
        "01_dog_8x12.png": (8, 12, 3),
        "02_fish_8x12.png": (8, 12, 3),
    }


def test_c2i_validates_at_step_0_and_every_step(c2i_run):
    out, _ = c2i_run
    assert sorted(os.listdir(out / "validation")) == ["final", "step-0", "step-1", "step-2"]
    baseline, later = images_in(out / "validation" / "step-0"), images_in(out / "validation" / "step-2")
    for name in baseline:
        assert np.abs(baseline[name].astype(int) - later[name]).max() > 10, name


def test_a_resumed_run_does_not_sample_step_0_again(assets, c2i_run, tmp_path):
    full, args = c2i_run
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args = [*args[: args.index("--output_dir")], "--output_dir", resumed, *args[args.index("--output_dir") + 2 :]]
    main_in_process(C2I_SCRIPT, [*args, "--max_train_steps", 3, "--resume_from_checkpoint", "latest"], tmp_path)
    assert sorted(os.listdir(resumed / "validation")) == ["final", "step-3"]


def test_two_processes_share_the_images_and_draw_the_same_ones(assets, t2i_run, tmp_path):
    """9 images on 2 processes (one renders a padding image), gathered: the values of one process's."""
    out = tmp_path / "two"
    args = without_prompts(t2i_args(assets, "captions_txt", out, *T2I_RUN))
    args += ["--validation_prompts_file", prompts_file(tmp_path), "--max_train_steps", 1, "--validation_steps", 2]
    launch(T2I_SCRIPT, args, tmp_path, num_processes=2)
    one, two = images_in(t2i_run / "validation" / "step-0"), images_in(out / "validation" / "step-0")
    assert sorted(two) == sorted(T2I_NAMES)
    # The same images, up to float rounding between processes (seen on some CPUs: 2 pixels one level apart in one
    # image); another seed or prompt would differ everywhere.
    differences = [np.abs(one[name].astype(int) - two[name].astype(int)) for name in T2I_NAMES]
    assert all(d.max() <= 1 and d.mean() < 0.01 for d in differences), [(d.max(), d.mean()) for d in differences]
    assert sorted(os.listdir(out / "validation" / "final")) == sorted(T2I_NAMES)


def test_tensorboard_gets_each_size_under_its_name(t2i_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Accelerate's writer (hyper-parameters go to a subfolder of their own).
    events = EventAccumulator(str(t2i_run / "logs" / "pixnerd-t2i"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["validation/16x16", "validation/24x16", "validation/8x8"]
    baseline = images_in(t2i_run / "validation" / "step-0")
    for tag, suffix in (("validation/16x16", ""), ("validation/24x16", "_24x16")):
        logged = events.Images(tag)
        assert [e.step for e in logged] == [0, 2, 2]  # step 0, step 2 and the final samples (also at step 2)
        row = np.asarray(PIL.Image.open(io.BytesIO(logged[0].encoded_image_string)).convert("RGB"))
        expected = [baseline[f"{i:02d}_{p.replace(' ', '_')}{suffix}.png"] for i, p in enumerate(PROMPTS)]
        assert np.array_equal(row, np.concatenate(expected, axis=1))  # the prompts side by side


def test_wandb_gets_each_size_under_its_name_with_captions(monkeypatch):
    from diffusers_pixnerd.training.validation import log_validation

    logged = {}
    fake_wandb = SimpleNamespace(Image=lambda data, caption: (data, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb)
    tracker = SimpleNamespace(name="wandb", log=lambda values, step: logged.update(values=values, step=step))
    images = [np.full((4, 4, 3), i, np.uint8) for i in range(2)] + [np.full((4, 8, 3), i, np.uint8) for i in (2, 3)]
    log_validation(SimpleNamespace(trackers=[tracker]), images, ["a cat", "a dog"], [(4, 4), (4, 8)], step=7)
    assert logged["step"] == 7
    assert list(logged["values"]) == ["validation/4x4", "validation/4x8"]
    wide = logged["values"]["validation/4x8"]
    assert [caption for _, caption in wide] == ["a cat", "a dog"]
    assert [int(image[0, 0, 0]) for image, _ in wide] == [2, 3] and wide[0][0].shape == (4, 8, 3)


def test_the_model_card_shows_the_final_and_the_step_0_images(t2i_run):
    card = (t2i_run / "README.md").read_text()
    shown = [line.split("](")[1].rstrip(")") for line in card.splitlines() if line.startswith("![")]
    assert shown == [f"validation/final/{n}" for n in T2I_NAMES] + [f"validation/step-0/{n}" for n in T2I_NAMES]
    assert "Before training (step 0" in card
    assert all((t2i_run / path).is_file() for path in shown)


def test_a_run_with_validation_off_samples_only_the_final_images(assets, tmp_path, run_main):
    out = tmp_path / "out"
    run_main(C2I_SCRIPT, c2i_args(assets, out, "--max_train_steps", 1, "--no_use_repa"))
    assert os.listdir(out / "validation") == ["final"]
    card = (out / "README.md").read_text()
    assert "validation/final/00_cat.png" in card and "step-0" not in card


@pytest.mark.parametrize(
    "sizes, message",
    [
        (["16x"], r"`--validation_sizes`: '16x' is not a size; expected `N` \(N x N pixels\) or `HxW`"),
        (["0"], r"`--validation_sizes`: '0' is not a size"),
        (["16", "big"], r"`--validation_sizes`: 'big' is not a size"),
    ],
)
def test_a_malformed_validation_size_is_refused_before_anything_loads(assets, tmp_path, sizes, message):
    with pytest.raises(ValueError, match=message):
        train_pixnerd_c2i.parse_args([str(a) for a in c2i_args(assets, tmp_path, "--validation_sizes", *sizes)])


def test_a_size_the_model_cannot_sample_is_refused_before_training(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 1, "--no_use_repa", "--validation_sizes", "16", "18x16")
    with pytest.raises(ValueError, match=r"`--validation_sizes`: 18x16 \(height x width\).*multiples of 4"):
        run_main(C2I_SCRIPT, args)
    assert not (out / "validation").exists() and not any(p.startswith("checkpoint") for p in os.listdir(out))


def test_bad_validation_prompts_files_are_refused(assets, tmp_path):
    parse_args = train_pixnerd_t2i.parse_args
    args = [str(a) for a in t2i_args(assets, "captions_txt", tmp_path / "out")]
    missing, empty = tmp_path / "missing.txt", tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="Pass one of `--validation_prompts` and `--validation_prompts_file`"):
        parse_args([*args, "--validation_prompts_file", str(prompts_file(tmp_path))])
    with pytest.raises(ValueError, match=f"`--validation_prompts_file` '{missing}' is not a file"):
        parse_args([*without_prompts(args), "--validation_prompts_file", str(missing)])
    with pytest.raises(ValueError, match=f"`--validation_prompts_file` '{empty}' has no prompt"):
        parse_args([*without_prompts(args), "--validation_prompts_file", str(empty)])
    assert parse_args(without_prompts(args)).validation_prompts == [
        "a red fox in the snow, golden hour",
        "a bowl of ramen on a wooden table",
    ]
