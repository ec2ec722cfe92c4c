"""The editing pipelines (pipelines/editing.py and the four `PixNerd*Img2ImgPipeline` / `PixNerd*InpaintPipeline`):
kept pixels byte-identical, the kept region on the scheduler's grid, strength counted as diffusers counts it,
outpainting, `from_pipe` / `from_pretrained` / AutoPipeline, LoRA and step caches, and bad input. On tiny random models,
and on the bundled Fashion-MNIST models for what needs a trained one."""

import os
import sys
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.pipelines.flux.pipeline_flux_img2img import FluxImg2ImgPipeline

from diffusers_pixnerd import (
    PixNerdFlowMatchScheduler,
    PixNerdImg2ImgPipeline,
    PixNerdInpaintPipeline,
    PixNerdPipeline,
    PixNerdT2IImg2ImgPipeline,
    PixNerdT2IInpaintPipeline,
    PixNerdT2IPipeline,
    PixNerdTransformer2DModel,
    load_pipeline,
)
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I, randomize_

from ..helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
import fashion_mnist  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


BUNDLED_C2I = os.path.join(ROOT, "models", "pixnerd-fashion-mnist")


BUNDLED_T2I = os.path.join(ROOT, "models", "pixnerd-t2i-fashion-mnist")


RED_LORA = os.path.join(ROOT, "models", "pixnerd-t2i-fashion-mnist-red-lora")


CLASSIFIER = os.path.join(ROOT, "models", "fashion-mnist-classifier.safetensors")


SIZE = TINY_T2I["sample_size"]


# ---------------------------------------------------------------------------------------------- pixel-space guarantees


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def condition(kind: str, batch: int = 1) -> dict:
    if kind == "c2i":
        return {"class_labels": list(range(1, batch + 1))}
    embeds = torch.randn(batch, TINY_T2I["text_max_length"], TINY_T2I["text_embed_dim"], generator=gen(7))
    return {"prompt_embeds": embeds, "negative_prompt_embeds": torch.zeros_like(embeds)}


def tiny(kind: str, steps: int = 4):
    """The generation pipeline of a tiny random model: "c2i" or "t2i" (called with `prompt_embeds`)."""
    torch.manual_seed(0)
    config = TINY_C2I if kind == "c2i" else TINY_T2I
    transformer = randomize_(PixNerdTransformer2DModel(**config)).eval()
    scheduler = PixNerdFlowMatchScheduler(num_inference_steps=steps, guidance_scale=3.0)
    pipe = PixNerdPipeline(transformer, scheduler) if kind == "c2i" else PixNerdT2IPipeline(transformer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def editing(kind: str, task: str, steps: int = 4):
    classes = {
        ("c2i", "img2img"): PixNerdImg2ImgPipeline,
        ("c2i", "inpaint"): PixNerdInpaintPipeline,
        ("t2i", "img2img"): PixNerdT2IImg2ImgPipeline,
        ("t2i", "inpaint"): PixNerdT2IInpaintPipeline,
    }
    return classes[kind, task].from_pipe(tiny(kind, steps))


def every_byte_image(height: int = SIZE, width: int = SIZE, seed: int = 0) -> PIL.Image.Image:
    """An RGB image holding every uint8 value (the hardest case for a [0, 1] -> [-1, 1] -> uint8 round trip)."""
    values = np.random.default_rng(seed).permutation(np.resize(np.arange(256, dtype=np.uint8), height * width * 3))
    return PIL.Image.fromarray(values.reshape(height, width, 3))


def half_mask(height: int = SIZE, width: int = SIZE) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    mask[:, width // 2 :] = 1
    return mask


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_inpainting_returns_the_kept_pixels_byte_identical_pil_in_pil_out(kind):
    pipe = editing(kind, "inpaint")
    image, mask = every_byte_image(), half_mask()
    out = pipe(**condition(kind), image=image, mask_image=mask, generator=gen()).images[0]
    a, b = np.asarray(out), np.asarray(image)
    assert out.size == image.size
    np.testing.assert_array_equal(a[:, : SIZE // 2], b[:, : SIZE // 2])
    assert np.abs(a[:, SIZE // 2 :].astype(int) - b[:, SIZE // 2 :]).mean() > 20  # the masked half is new


def test_a_soft_mask_blends_and_keeps_its_black_pixels_exact():
    pipe = editing("t2i", "inpaint")
    image = every_byte_image()
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:, 8:12], mask[:, 12:] = 0.5, 1.0  # a gray band between the kept and the repainted part
    hard = half_mask()
    hard[:, 8:12] = 1
    kwargs = dict(**condition("t2i"), image=image, output_type="pt")
    soft = pipe(**kwargs, mask_image=mask, generator=gen()).images[0]
    full = pipe(**kwargs, mask_image=hard, generator=gen()).images[0]
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(soft[:, :, :8], pixels[:, :, :8], rtol=0, atol=1e-6)
    # The band is neither the input nor the fully repainted image: between the two.
    band, band_full, band_in = soft[:, :, 8:12], full[:, :, 8:12], pixels[:, :, 8:12]
    assert (band - band_in).abs().mean() > 0.02 and (band - band_full).abs().mean() > 0.02


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_the_kept_region_follows_the_noised_input_on_the_schedulers_grid(kind):
    pipe = editing(kind, "inpaint", steps=5)
    image, mask = every_byte_image(), torch.from_numpy(half_mask())
    noise = torch.randn(1, 3, SIZE, SIZE, generator=gen(3))
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    seen = []

    def record(pipe, step, timestep, tensors):
        seen.append(tensors["latents"].clone())
        return {}

    pipe(**condition(kind), image=image, mask_image=mask, strength=0.8, latents=noise, callback_on_step_end=record)
    timesteps = pipe.scheduler.timesteps[1:]  # strength 0.8 of 5 steps: the last 4
    assert len(seen) == 4 and pipe.scheduler.begin_index == 1
    for step, latents in enumerate(seen[:-1]):
        expected = pipe.scheduler.scale_noise(pixels, timesteps[step + 1 : step + 2], noise)
        torch.testing.assert_close(latents[..., mask == 0], expected[..., mask == 0], rtol=0, atol=0)
    torch.testing.assert_close(seen[-1][..., mask == 0], pixels[..., mask == 0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "steps, strength", [(10, 0.6), (25, 0.6), (50, 0.3), (4, 0.75), (7, 0.5), (3, 0.34), (20, 1.0), (28, 0.95)]
)
def test_strength_runs_the_steps_diffusers_runs(steps, strength, monkeypatch):
    pipe = editing("t2i", "img2img", steps=steps)
    calls = []
    forward = pipe.transformer.forward
    monkeypatch.setattr(pipe.transformer, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    pipe(**condition("t2i"), image=every_byte_image(), strength=strength, guidance_scale=1.0, generator=gen())
    # diffusers' own count (FluxImg2ImgPipeline.get_timesteps) on the same scheduler: the same steps, the same start.
    scheduler = PixNerdFlowMatchScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    timesteps, count = FluxImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    assert len(calls) == count == len(timesteps)
    assert scheduler.begin_index == pipe.scheduler.begin_index


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_img2img_at_strength_1_is_generation_from_the_same_noise(kind):
    pipe = editing(kind, "img2img")
    noise = torch.randn(1, 3, SIZE, SIZE, generator=gen(5))
    edited = pipe(**condition(kind), image=every_byte_image(), strength=1.0, latents=noise, output_type="latent")
    generator_pipe = (PixNerdPipeline if kind == "c2i" else PixNerdT2IPipeline).from_pipe(pipe)
    generated = generator_pipe(**condition(kind), latents=noise, output_type="latent")
    torch.testing.assert_close(edited.images, generated.images, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_inpainting_with_everything_masked_is_img2img(kind):
    img2img = editing(kind, "img2img")
    inpaint = (PixNerdInpaintPipeline if kind == "c2i" else PixNerdT2IInpaintPipeline).from_pipe(img2img)
    kwargs = dict(**condition(kind), image=every_byte_image(), strength=0.6, output_type="latent")
    everything = np.ones((SIZE, SIZE), np.float32)
    torch.testing.assert_close(
        inpaint(**kwargs, mask_image=everything, generator=gen()).images,
        img2img(**kwargs, generator=gen()).images,
        rtol=0,
        atol=0,
    )


def test_img2img_changes_the_image_more_at_higher_strength():
    pipe = editing("t2i", "img2img", steps=10)
    image = every_byte_image()
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    changes = []
    for strength in (0.1, 0.3, 0.6, 1.0):
        out = pipe(**condition("t2i"), image=image, strength=strength, generator=gen(), output_type="latent")
        changes.append((out.images - pixels).abs().mean().item())
    assert changes == sorted(changes) and changes[0] < 0.5 * changes[-1], changes


def test_one_image_per_prompt_is_repeated_for_its_images():
    pipe = editing("c2i", "inpaint")
    images = [every_byte_image(seed=1), every_byte_image(seed=2)]
    out = pipe(
        class_labels=[3, 4], image=images, mask_image=half_mask(), num_images_per_prompt=2, generator=gen()
    ).images
    kept = [np.asarray(im)[:, : SIZE // 2] for im in images]
    for i, expected in enumerate([kept[0], kept[0], kept[1], kept[1]]):
        np.testing.assert_array_equal(np.asarray(out[i])[:, : SIZE // 2], expected)


# --------------------------------------------------------------------------------------------------------- outpainting


@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_outpainting_paints_a_wider_canvas_and_keeps_the_image(kind):
    pipe = editing(kind, "inpaint")
    image = every_byte_image()
    out = pipe(**condition(kind), image=image, width=2 * SIZE, image_offset=(0, 0), generator=gen()).images[0]
    a = np.asarray(out)
    assert out.size == (2 * SIZE, SIZE)
    np.testing.assert_array_equal(a[:, :SIZE], np.asarray(image))
    assert a[:, SIZE:].std() > 10  # painted, not a flat fill
    # By default the image is centred; a mask of the image's size repaints inside it too.
    centred = np.asarray(pipe(**condition(kind), image=image, height=2 * SIZE, generator=gen()).images[0])
    np.testing.assert_array_equal(centred[SIZE // 2 : SIZE // 2 + SIZE], np.asarray(image))
    masked = pipe(**condition(kind), image=image, mask_image=half_mask(), width=2 * SIZE, image_offset=(0, SIZE),
                  generator=gen()).images[0]  # fmt: skip
    b = np.asarray(masked)
    np.testing.assert_array_equal(b[:, SIZE : SIZE + SIZE // 2], np.asarray(image)[:, : SIZE // 2])
    assert not np.array_equal(b[:, SIZE + SIZE // 2 :], np.asarray(image)[:, SIZE // 2 :])


# ------------------------------------------------------------------------------------------------ building and loading


def test_from_pipe_shares_the_components_and_from_pretrained_loads_the_same_folder(tmp_path):
    base = tiny("t2i")
    base.save_pretrained(tmp_path / "pipe")
    shared = PixNerdT2IInpaintPipeline.from_pipe(base)
    assert shared.transformer is base.transformer and shared.scheduler.config == base.scheduler.config
    loaded = PixNerdT2IInpaintPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(**condition("t2i"), image=every_byte_image(), mask_image=half_mask(), output_type="latent")
    # Equal weights; separately loaded copies round differently in this CPU's kernels (1e-4 here, not O(1)).
    torch.testing.assert_close(
        loaded(**kwargs, generator=gen()).images, shared(**kwargs, generator=gen()).images, rtol=0, atol=1e-3
    )
    # An editing pipeline saved and loaded keeps its class, through `load_pipeline` too.
    shared.save_pretrained(tmp_path / "inpaint")
    assert type(load_pipeline(str(tmp_path / "inpaint"))) is PixNerdT2IInpaintPipeline
    c2i = PixNerdImg2ImgPipeline.from_pipe(tiny("c2i"))
    assert c2i.transformer.config.num_classes == TINY_C2I["num_classes"]


def test_official_checkpoints_load_into_the_editing_pipeline_of_their_kind():
    from ..helpers import C2I_CKPT, T2I_CKPT

    assert type(PixNerdInpaintPipeline.from_single_file(C2I_CKPT)) is PixNerdInpaintPipeline
    pipe = PixNerdT2IImg2ImgPipeline.from_single_file(T2I_CKPT, text_encoder=None)
    assert type(pipe) is PixNerdT2IImg2ImgPipeline and pipe.transformer.is_text_conditional
    with pytest.raises(ValueError, match=r"checkpoint for PixNerdPipeline, not PixNerdT2IInpaintPipeline"):
        PixNerdT2IInpaintPipeline.from_single_file(C2I_CKPT)
    with pytest.raises(ValueError, match=r"checkpoint for PixNerdT2IPipeline, not PixNerdImg2ImgPipeline"):
        PixNerdImg2ImgPipeline.from_single_file(T2I_CKPT, text_encoder=None)


def test_autopipelines_find_the_pixnerd_pipeline_of_each_task(tmp_path):
    for kind, classes in (
        ("t2i", (PixNerdT2IPipeline, PixNerdT2IImg2ImgPipeline, PixNerdT2IInpaintPipeline)),
        ("c2i", (PixNerdPipeline, PixNerdImg2ImgPipeline, PixNerdInpaintPipeline)),
    ):
        base = tiny(kind)
        base.save_pretrained(tmp_path / kind)
        autos = (AutoPipelineForText2Image, AutoPipelineForImage2Image, AutoPipelineForInpainting)
        for auto, expected in zip(autos, classes):
            assert type(auto.from_pipe(base)) is expected
            assert type(auto.from_pretrained(tmp_path / kind)) is expected
        inpaint = AutoPipelineForInpainting.from_pipe(base)
        assert type(AutoPipelineForText2Image.from_pipe(inpaint)) is classes[0]
        assert inpaint.transformer is base.transformer


def test_step_caches_work_in_the_editing_pipelines():
    pipe = editing("t2i", "inpaint", steps=6)
    pipe.transformer.double()  # as in tests/models/test_cache.py: the branches as two calls round alike in float64
    image, mask = every_byte_image(), half_mask()
    kwargs = dict(**condition("t2i"), image=image, mask_image=mask, output_type="latent")
    plain = pipe(**kwargs, generator=gen()).images
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))  # never skips: the same result
    torch.testing.assert_close(pipe(**kwargs, generator=gen()).images, plain, rtol=0, atol=1e-12)
    pipe.transformer.disable_cache()
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))  # skips every step it may
    skipped = pipe(**{**kwargs, "output_type": "pil"}, generator=gen()).images[0]
    pipe.transformer.disable_cache()
    np.testing.assert_array_equal(np.asarray(skipped)[:, : SIZE // 2], np.asarray(image)[:, : SIZE // 2])


# ----------------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "task, kwargs, message",
    [
        ("inpaint", dict(mask_image=np.zeros((8, 8), np.float32)), r"`mask_image` is 8x8 but `image` is 16x16"),
        ("inpaint", dict(mask_image=np.zeros((SIZE, SIZE, 3), np.float32)), r"`mask_image` must have one channel"),
        ("inpaint", dict(mask_image=torch.zeros(3, SIZE, SIZE)), r"`mask_image` must have one channel"),
        (
            "inpaint",
            dict(mask_image=np.full((SIZE, SIZE), 2.0, np.float32)),
            r"`mask_image` values must lie in \[0, 1\]",
        ),
        ("inpaint", dict(mask_image=-half_mask()), r"`mask_image` values must lie in \[0, 1\]"),
        ("inpaint", dict(mask_image=None), r"`mask_image` is required"),
        ("inpaint", dict(mask_image="mask.png"), r"`mask_image` must be a PIL image, a numpy array"),
        ("img2img", dict(strength=0.0), r"`strength` must be a number in \(0, 1\].*got 0.0"),
        ("img2img", dict(strength=1.5), r"`strength` must be a number in \(0, 1\].*got 1.5"),
        ("img2img", dict(strength="0.5"), r"`strength` must be a number in \(0, 1\].*got '0.5'"),
        ("img2img", dict(strength=1e-20), r"`strength` 1e-20 runs no step of the 4 of `num_inference_steps`.*0.25"),
        ("img2img", dict(height=32), r"`height` x `width` \(32x16\) differ from the size of `image` \(16x16\)"),
        ("inpaint", dict(mask_image=None, width=32, strength=0.5), r"`strength` must be 1.0 when painting a canvas"),
        ("inpaint", dict(mask_image=None, width=8), r"`image` \(16x16, height x width\) is larger than the canvas"),
        ("inpaint", dict(width=32, image_offset=(0, 20)), r"`image_offset` \(0, 20\) puts the 16x16 image outside"),
        ("inpaint", dict(width=32, image_offset=(0.5, 0)), r"`image_offset` must be a pair of integers"),
        ("inpaint", dict(width=34), r"`height` and `width` must be positive multiples of 4"),
        ("img2img", dict(image=None), r"`image` is required"),
        ("img2img", dict(image=[every_byte_image()] * 3), r"`image` holds 3 images for 1 prompts"),
        ("img2img", dict(image=np.zeros((SIZE, SIZE, 3), np.float32) + 1.5), r"`image` values must lie in \[0, 1\]"),
        ("img2img", dict(image=[every_byte_image(), every_byte_image(8, 8)]), r"The images of `image` must have one"),
        ("img2img", dict(image=torch.zeros(4, SIZE, SIZE)), r"`image` must have 1 or 3 channels"),
    ],
)
def test_bad_editing_input_is_a_clear_error(task, kwargs, message):
    pipe = editing("t2i", task)
    call = dict(**condition("t2i"), image=every_byte_image(), generator=gen())
    if task == "inpaint":
        call["mask_image"] = half_mask()
    with pytest.raises(ValueError, match=message):
        pipe(**{**call, **kwargs})


def test_images_and_masks_in_every_format_agree():
    pipe = editing("c2i", "inpaint")
    image = every_byte_image()
    array = np.asarray(image)
    mask = half_mask()
    formats = [
        (image, PIL.Image.fromarray((mask * 255).astype(np.uint8))),
        (array, mask),
        (array.astype(np.float32) / 255, (mask * 255).astype(np.uint8)),
        (torch.tensor(array).permute(2, 0, 1).float() / 255, torch.from_numpy(mask)[None]),
        (torch.tensor(array).permute(2, 0, 1).float() / 127.5 - 1, torch.from_numpy(mask)),  # [-1, 1] tensor
        ([image], [mask[..., None]]),
    ]
    outs = [
        pipe(class_labels=2, image=im, mask_image=m, generator=gen(), output_type="latent").images for im, m in formats
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- on the bundled models


def test_bundled_models_inpaint_a_half_as_the_images_class_and_keep_the_other():
    images, labels = fashion_mnist.load_split("test")
    images, labels = images[9000:9020], labels[9000:9020]
    classifier = fashion_mnist.load_classifier(CLASSIFIER)
    mask = np.zeros((32, 32), np.float32)
    mask[:, 16:] = 1
    inputs = [PIL.Image.fromarray(a).convert("RGB") for a in images]
    for model in (BUNDLED_C2I, BUNDLED_T2I):
        base = load_pipeline(model)
        pipe = (PixNerdInpaintPipeline if isinstance(base, PixNerdPipeline) else PixNerdT2IInpaintPipeline).from_pipe(
            base
        )
        pipe.set_progress_bar_config(disable=True)
        rng = np.random.default_rng(0)
        if isinstance(base, PixNerdPipeline):
            cond = {"class_labels": labels.tolist()}
        else:
            cond = {"prompt": [fashion_mnist.caption(c, rng, fashion_mnist.HELDOUT_TEMPLATES) for c in labels]}
        out = pipe(**cond, image=inputs, mask_image=mask, num_inference_steps=20, generator=gen()).images
        arrays = np.stack([np.asarray(o) for o in out])
        np.testing.assert_array_equal(arrays[:, :, :16], np.stack([np.asarray(i) for i in inputs])[:, :, :16])
        gray = arrays.mean(-1).round().astype(np.uint8)
        acc = fashion_mnist.accuracy(classifier, fashion_mnist.to_model_input(gray), torch.from_numpy(labels))
        erased = images * (1 - mask).astype(np.uint8)
        erased_acc = fashion_mnist.accuracy(classifier, fashion_mnist.to_model_input(erased), torch.from_numpy(labels))
        assert acc >= 0.8 and acc > erased_acc, (model, acc, erased_acc)


def test_the_red_lora_turns_a_gray_garment_red_in_img2img():
    images, _ = fashion_mnist.load_split("test")
    inputs = [PIL.Image.fromarray(a).convert("RGB") for a in images[9100:9108]]
    pipe = PixNerdT2IImg2ImgPipeline.from_pipe(load_pipeline(BUNDLED_T2I))
    pipe.set_progress_bar_config(disable=True)
    prompts = [row["prompt"] for row in fashion_mnist.heldout_prompts(8, seed=3, prefix="red")]

    def redness():
        out = pipe(prompts, image=inputs, strength=0.8, num_inference_steps=20, generator=gen(), output_type="np")
        return fashion_mnist.redness(np.round(out.images * 255).astype(np.uint8))

    base = redness()
    pipe.load_lora_weights(RED_LORA)
    red = redness()
    assert base < 0.05 and red > 0.3, (base, red)


def test_the_readme_inpainting_example_runs_and_keeps_the_left_half(monkeypatch):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        blocks = [b.removeprefix("py\n") for b in f.read().split("```")[1::2] if "PixNerdT2IInpaintPipeline" in b]
    assert len(blocks) == 1
    monkeypatch.chdir(ROOT)
    namespace = {}
    exec(blocks[0], namespace)
    coat = np.asarray(namespace["coat"].convert("RGB"))
    image = np.asarray(namespace["image"])
    np.testing.assert_array_equal(image[:, :16], coat[:, :16])
    assert np.abs(image[:, 16:].astype(int) - coat[:, 16:]).mean() > 5
