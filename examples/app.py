"""A Gradio web demo of PixNerd: class-conditional and text-to-image tabs, with the denoising trajectory, and an edit
tab (inpainting, outpainting, image-to-image).

    python examples/app.py                                   # the bundled Fashion-MNIST models, http://127.0.0.1:7860
    python examples/app.py --model MCG-NJU/PixNerd-XL-P16-C2I --t2i_model MCG-NJU/PixNerd-XXL-P16-T2I --device cuda

Needs `pip install gradio` (the `[demo]` extra). The server binds to 127.0.0.1 only. Requests wait in a queue of at
most `MAX_QUEUE` and run one at a time; the server enforces the sliders' caps (`MAX_STEPS` steps, sides up to
`MAX_SIZE_FACTOR` times the trained size); an argument the pipeline rejects is shown with the pipeline's message; each
request's trajectory GIF is deleted after `KEEP_FILES_SECONDS`, and all of them when the server stops.
"""

import argparse
import atexit
import glob
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from diffusers_pixnerd import (
    PixNerdFlowMatchScheduler,
    PixNerdInpaintPipeline,
    PixNerdPipeline,
    PixNerdT2IInpaintPipeline,
    PixNerdT2IPipeline,
    load_pipeline,
)

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
BUNDLED_MODEL = os.path.join(MODELS, "pixnerd-fashion-mnist")
BUNDLED_T2I_MODEL = os.path.join(MODELS, "pixnerd-t2i-fashion-mnist")
# Fashion-MNIST test images (never trained on) to edit without an upload.
EDIT_SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "edit_samples")
# The edit tab's masks: what is painted over in the image, or a preset (white = repaint).
EDIT_MASKS = (
    "painted",
    "right half",
    "left half",
    "top half",
    "bottom half",
    "centre",
    "none: image-to-image",
    "outpaint: twice as wide",
)

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

MAX_QUEUE = 16
MAX_STEPS = 100
MAX_SIZE_FACTOR = 4
KEEP_FILES_SECONDS = 600  # long enough for the browser to fetch a result

FILES_DIR = tempfile.mkdtemp(prefix="pixnerd-app-")
atexit.register(shutil.rmtree, FILES_DIR, ignore_errors=True)


def remove_old_files(max_age: float = KEEP_FILES_SECONDS):
    """Deletes the trajectories of earlier requests older than `max_age` seconds."""
    now = time.time()
    for path in glob.glob(os.path.join(FILES_DIR, "*.gif")):
        try:
            if now - os.path.getmtime(path) > max_age:
                os.remove(path)
        except FileNotFoundError:  # removed by a concurrent request
            pass


def to_pil(pixels: torch.Tensor, size: int) -> Image.Image:
    """One (3, H, W) image in [-1, 1] -> PIL, scaled up (nearest) so small images stay visible."""
    array = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    image = Image.fromarray(array)
    scale = max(1, size // max(image.size))
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def generate(pipe, condition: dict, settings: dict) -> tuple[Image.Image, str]:
    """The final image and a GIF of the trajectory (the latents after each step)."""
    pipe.scheduler = PixNerdFlowMatchScheduler.from_config(
        pipe.scheduler.config, shift=settings.pop("shift"), solver_order=int(settings.pop("solver_order"))
    )
    frames = []

    def keep_frames(pipe, step, timestep, tensors):
        frames.append(to_pil(tensors["latents"][0], 256))
        return {}

    seed = int(settings.pop("seed"))
    if not 0 <= seed < 2**63:
        raise ValueError(f"The seed must be a whole number from 0 to 2**63 - 1 ({2**63 - 1}), got {seed}.")
    latents = pipe(
        **condition,
        **settings,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        callback_on_step_end=keep_frames,
    ).images
    final = to_pil(latents[0], 256)
    remove_old_files()
    path = tempfile.mkstemp(suffix=".gif", prefix="trajectory-", dir=FILES_DIR)[1]
    frames[0].save(path, save_all=True, append_images=frames[1:] + [final] * 3, duration=120, loop=0)
    return final, path


def checked_settings(values: dict, max_size: int) -> dict:
    """The request's settings within the demo's caps (the sliders' limits, enforced here for API calls too)."""
    if not 1 <= values["num_inference_steps"] <= MAX_STEPS:
        raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {values['num_inference_steps']}.")
    for name in ("height", "width"):
        if not 1 <= values[name] <= max_size:
            raise ValueError(f"{name} must be in [1, {max_size}] for this model, got {values[name]}.")
    if values["guidance_interval"][0] > values["guidance_interval"][1]:
        raise ValueError("The guidance interval needs min <= max.")
    return values


def run_request(pipe, condition: dict, values: dict, max_size: int):
    """`generate` for one request; a bad argument becomes a message in the page (`gradio.Error`), not a bare
    "Error"."""
    import gradio as gr

    try:
        return generate(pipe, condition, checked_settings(values, max_size))
    except (ValueError, TypeError) as error:
        raise gr.Error(str(error)) from error


def edit_samples() -> dict[str, str]:
    """The sample images of the edit tab by name."""
    names = sorted(f for f in os.listdir(EDIT_SAMPLES) if f.endswith(".png")) if os.path.isdir(EDIT_SAMPLES) else []
    return {os.path.splitext(f)[0]: os.path.join(EDIT_SAMPLES, f) for f in names}


def edit_mask(choice: str, editor: dict | None, height: int, width: int) -> np.ndarray | None:
    """The mask of an edit request (float (H, W), 1 = repaint): what was painted over the image (the layers' alpha),
    or a preset; `None` for image-to-image and for outpainting (the new area is the pipeline's to paint)."""
    mask = np.zeros((height, width), np.float32)
    if choice == "painted":
        for layer in (editor or {}).get("layers") or []:
            alpha = np.asarray(layer.convert("RGBA").resize((width, height), Image.NEAREST))[..., 3]
            mask = np.maximum(mask, alpha.astype(np.float32) / 255)
        if not mask.any():
            raise ValueError("Paint over the part of the image to repaint, or pick a mask.")
        return mask
    if choice in ("none: image-to-image", "outpaint: twice as wide"):
        return None
    h, w = height // 2, width // 2
    regions = {
        "right half": (slice(None), slice(w, None)),
        "left half": (slice(None), slice(None, w)),
        "top half": (slice(None, h), slice(None)),
        "bottom half": (slice(h, None), slice(None)),
        "centre": (slice(height // 4, height - height // 4), slice(width // 4, width - width // 4)),
    }
    if choice not in regions:
        raise ValueError(f"The mask must be one of {list(EDIT_MASKS)}, got {choice!r}.")
    mask[regions[choice]] = 1
    return mask


def edit(pipe, condition: dict, editor: dict | None, choice: str, settings: dict) -> tuple[Image.Image, Image.Image]:
    """The edited image and the mask used (both scaled up for display). `pipe` is an inpainting pipeline; image-to-image
    is inpainting with everything masked and `strength` below 1 (the same sampling as the image-to-image pipeline)."""
    image = (editor or {}).get("background")
    if image is None:
        raise ValueError("Upload an image or pick a sample first.")
    image = image.convert("RGB")
    multiple = pipe.transformer.resolution_multiple
    if image.width % multiple or image.height % multiple:  # the demo crops to the model's size multiple
        image = image.crop((0, 0, image.width - image.width % multiple, image.height - image.height % multiple))
    mask = edit_mask(choice, editor, image.height, image.width)
    seed = int(settings.pop("seed"))
    if not 0 <= seed < 2**63:
        raise ValueError(f"The seed must be a whole number from 0 to 2**63 - 1 ({2**63 - 1}), got {seed}.")
    kwargs = dict(image=image, mask_image=mask, generator=torch.Generator().manual_seed(seed), **settings)
    if choice == "none: image-to-image":
        kwargs["mask_image"] = np.ones((image.height, image.width), np.float32)
    elif choice == "outpaint: twice as wide":
        kwargs.update(width=2 * image.width, image_offset=(0, 0), strength=1.0)
    out = pipe(**condition, **kwargs).images[0]
    shown = np.zeros((out.height, out.width), np.uint8) + 255
    if kwargs["mask_image"] is not None:
        shown[: image.height, : image.width] = np.round(kwargs["mask_image"] * 255).astype(np.uint8)
    elif choice == "outpaint: twice as wide":
        shown[:, : image.width] = 0
    scale = max(1, 256 // max(out.size))
    return (
        out.resize((out.width * scale, out.height * scale), Image.NEAREST),
        Image.fromarray(shown).resize((out.width * scale, out.height * scale), Image.NEAREST),
    )


def run_edit(pipe, condition: dict, editor, choice: str, values: dict, max_size: int):
    """`edit` for one request, within the demo's caps; a bad argument becomes a message in the page."""
    import gradio as gr

    try:
        if not 1 <= values["num_inference_steps"] <= MAX_STEPS:
            raise ValueError(f"steps must be in [1, {MAX_STEPS}], got {values['num_inference_steps']}.")
        background = (editor or {}).get("background")
        if background is not None and max(background.size) * (2 if choice.startswith("outpaint") else 1) > max_size:
            raise ValueError(f"The image (and its canvas) must be at most {max_size} pixels a side for this model.")
        return edit(pipe, condition, editor, choice, dict(values))
    except (ValueError, TypeError) as error:
        raise gr.Error(str(error)) from error


def build_demo(c2i: PixNerdPipeline | None, t2i: PixNerdT2IPipeline | None, default_prompt: str = "a photo of a fox"):
    import gradio as gr

    def sampling_controls(pipe, default_size):
        config = pipe.scheduler.config if pipe is not None else {}
        step = pipe.transformer.resolution_multiple if pipe is not None else 32
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, value=config.get("num_inference_steps", 25), step=1, label="steps")
            cfg = gr.Slider(1.0, 10.0, value=config.get("guidance_scale", 4.0), step=0.25, label="guidance scale")
            seed = gr.Number(value=0, precision=0, label="seed")
        with gr.Row():
            interval_min = gr.Slider(
                0.0, 1.0, value=config.get("guidance_interval_min", 0.0), label="interval min (t)"
            )
            interval_max = gr.Slider(
                0.0, 1.0, value=config.get("guidance_interval_max", 1.0), label="interval max (t)"
            )
            shift = gr.Slider(0.5, 6.0, value=config.get("shift", 1.0), step=0.5, label="time shift")
            order = gr.Radio([1, 2], value=config.get("solver_order", 2), label="solver order (1 Euler, 2 Adams)")
        with gr.Row():
            height = gr.Slider(step, MAX_SIZE_FACTOR * default_size, value=default_size, step=step, label="height")
            width = gr.Slider(step, MAX_SIZE_FACTOR * default_size, value=default_size, step=step, label="width")
        return [steps, cfg, seed, interval_min, interval_max, shift, order, height, width]

    def settings(steps, cfg, seed, interval_min, interval_max, shift, order, height, width):
        return dict(
            num_inference_steps=int(steps),
            guidance_scale=float(cfg),
            guidance_interval=(float(interval_min), float(interval_max)),
            seed=seed,
            shift=float(shift),
            solver_order=order,
            height=int(height),
            width=int(width),
        )

    with gr.Blocks(title="PixNerd") as demo:
        gr.Markdown("# PixNerd: pixel neural field diffusion")
        if c2i is not None:
            with gr.Tab("Class-conditional"):
                names = [
                    v.split(",")[0].strip() for _, v in sorted((int(k), v) for k, v in c2i.config.id2label.items())
                ]
                label = gr.Dropdown(names, value=names[0], label="class")
                controls = sampling_controls(c2i, c2i.transformer.config.sample_size)
                button = gr.Button("Generate", elem_id="generate-c2i")
                with gr.Row():
                    image = gr.Image(label="sample", elem_id="image-c2i", type="pil")
                    trajectory = gr.Image(label="trajectory", elem_id="trajectory-c2i", type="filepath")
                c2i_size = MAX_SIZE_FACTOR * c2i.transformer.config.sample_size

                def run(name, *values):
                    return run_request(c2i, {"class_labels": name}, settings(*values), c2i_size)

                button.click(run, [label, *controls], [image, trajectory])
        if t2i is not None:
            with gr.Tab("Text-to-image", elem_id="tab-t2i"):
                prompt = gr.Textbox(value=default_prompt, label="prompt", elem_id="prompt-t2i")
                negative = gr.Textbox(value="", label="negative prompt")
                controls = sampling_controls(t2i, t2i.transformer.config.sample_size)
                button = gr.Button("Generate", elem_id="generate-t2i")
                with gr.Row():
                    image = gr.Image(label="sample", elem_id="image-t2i", type="pil")
                    trajectory = gr.Image(label="trajectory", elem_id="trajectory-t2i", type="filepath")

                t2i_size = MAX_SIZE_FACTOR * t2i.transformer.config.sample_size

                def run_t2i(text, negative_text, *values):
                    condition = {"prompt": text, "negative_prompt": negative_text}
                    return run_request(t2i, condition, settings(*values), t2i_size)

                button.click(run_t2i, [prompt, negative, *controls], [image, trajectory])
        else:
            with gr.Tab("Text-to-image"):
                gr.Markdown("Start the app with `--t2i_model` (a PixNerd text-to-image pipeline) to use this tab.")
        base = t2i if t2i is not None else c2i
        if base is not None:
            edit_tab(base)
    return demo


def edit_tab(base):
    """The edit tab on `base` (the text-to-image pipeline, else the class-conditional one), through its inpainting
    pipeline (`from_pipe`: the same weights)."""
    import gradio as gr

    text = isinstance(base, PixNerdT2IPipeline)
    pipe = (PixNerdT2IInpaintPipeline if text else PixNerdInpaintPipeline).from_pipe(base)
    samples = edit_samples()
    with gr.Tab("Edit", elem_id="tab-edit"):
        gr.Markdown(
            "Upload an image or pick a sample, paint over what to repaint (or pick a mask), describe it, edit. The "
            "pixels outside the mask come back exactly as they went in. Image-to-image keeps the whole image as a "
            "start (strength below 1: lower keeps more); outpainting paints a canvas twice as wide to the right."
        )
        with gr.Row():
            editor = gr.ImageMask(label="image (paint = repaint)", type="pil", elem_id="edit-image")
            with gr.Column():
                sample = gr.Dropdown(list(samples), value=None, label="sample image", elem_id="edit-sample")
                choice = gr.Radio(list(EDIT_MASKS), value="painted", label="mask", elem_id="edit-mask")
                if text:
                    condition = gr.Textbox(value="a photo of a sneaker", label="prompt", elem_id="prompt-edit")
                else:
                    names = [
                        v.split(",")[0].strip()
                        for _, v in sorted((int(k), v) for k, v in base.config.id2label.items())
                    ]
                    condition = gr.Dropdown(names, value=names[0], label="class", elem_id="class-edit")
                strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="strength", elem_id="edit-strength")
        config = base.scheduler.config
        with gr.Row():
            steps = gr.Slider(1, MAX_STEPS, value=config.get("num_inference_steps", 25), step=1, label="steps")
            cfg = gr.Slider(1.0, 10.0, value=config.get("guidance_scale", 4.0), step=0.25, label="guidance scale")
            seed = gr.Number(value=0, precision=0, label="seed")
        button = gr.Button("Edit", elem_id="generate-edit")
        with gr.Row():
            result = gr.Image(label="edited", elem_id="image-edit", type="pil")
            shown_mask = gr.Image(label="mask (white = repainted)", elem_id="mask-edit", type="pil")
        max_size = MAX_SIZE_FACTOR * base.transformer.config.sample_size

        sample.change(lambda name: Image.open(samples[name]).convert("RGB") if name else None, sample, editor)
        # Image-to-image starts from the image: a strength below 1 (diffusers' default 0.6); masks repaint from noise.
        choice.change(lambda c: 0.6 if c == "none: image-to-image" else 1.0, choice, strength)

        def run(editor_value, mask_choice, cond, strength_value, steps_value, cfg_value, seed_value):
            values = dict(
                num_inference_steps=int(steps_value),
                guidance_scale=float(cfg_value),
                strength=float(strength_value),
                seed=seed_value,
            )
            condition_kwargs = {"prompt": cond} if text else {"class_labels": cond}
            return run_edit(pipe, condition_kwargs, editor_value, mask_choice, values, max_size)

        button.click(run, [editor, choice, condition, strength, steps, cfg, seed], [result, shown_mask])


def bounded_queue(demo):
    """At most `MAX_QUEUE` waiting requests (more are turned away with a message), one running at a time."""
    return demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_MODEL, help="Class-conditional pipeline ('none' to leave out).")
    parser.add_argument(
        "--t2i_model",
        default=BUNDLED_T2I_MODEL,
        help="Text-to-image pipeline (folder, Hub id or .ckpt; 'none' to leave out). Default: the bundled one.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--port", type=int, default=7860)
    return parser.parse_args(input_args)


def main(args):
    dtype = getattr(torch, args.dtype)
    c2i = None if args.model == "none" else load_pipeline(args.model, dtype=dtype, device=args.device)
    t2i = None if args.t2i_model in (None, "none") else load_pipeline(args.t2i_model, dtype=dtype, device=args.device)
    bundled = args.t2i_model and os.path.abspath(args.t2i_model) == os.path.abspath(BUNDLED_T2I_MODEL)
    demo = build_demo(c2i, t2i, "a photo of a sneaker" if bundled else "a photo of a red fox in the snow")
    bounded_queue(demo).launch(server_name="127.0.0.1", server_port=args.port, share=False)


if __name__ == "__main__":
    main(parse_args())
