"""Generate a labelled image grid with a PixNerd pipeline (the README's demo command).

    python examples/generate.py                                      # the bundled Fashion-MNIST model, offline
    python examples/generate.py --model models/pixnerd-t2i-fashion-mnist --prompt "a sneaker" "a photo of a bag"
    python examples/generate.py --model models/pixnerd-t2i-fashion-mnist --lora models/pixnerd-t2i-fashion-mnist-red-lora \
        --prompt "a red dress" --lora_scale 1.0
    python examples/generate.py --model MCG-NJU/PixNerd-XL-P16-C2I --class_labels "golden retriever" 207
    python examples/generate.py --model MCG-NJU/PixNerd-XXL-P16-T2I --prompt "a red fox in the snow"
    python examples/generate.py --model path/to/official.ckpt        # an official checkpoint file

    python examples/generate.py --cache first_block:threshold=0.2 --compile regional

    python examples/generate.py --model models/pixnerd-t2i-fashion-mnist --lora models/pixnerd-t2i-fashion-mnist-turbo-lora \
        --beside_default --output outputs/demo_t2i_turbo_grid.png    # 4 steps beside the default sampler, timed

`--model` is a pipeline folder, a Hub repo id (diffusers format or an official one, converted on first use) or an
official checkpoint file, loaded by `diffusers_pixnerd.load_pipeline`. `--cache NAME[:key=value,...]` enables one of
diffusers' caches on the transformer (`first_block`, `taylorseer`, `pab`, `mag`; the keys are the fields of its
diffusers config; docs/benchmarks.md has measured settings); `--compile regional` compiles the repeated DiT blocks,
`--compile full` the whole transformer. `--beside_default` (with a LoRA, e.g. a few-step one) puts the grid beside the
same prompts and seeds sampled by the model alone with its saved sampler, each headed with its steps, guidance and
sampling time. Prints the path of the grid it writes.
"""

import argparse
import os
import time

import torch
from PIL import Image, ImageDraw, ImageFont

from diffusers_pixnerd import PixNerdT2IPipeline, load_pipeline

MODELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
BUNDLED_MODEL = os.path.join(MODELS, "pixnerd-fashion-mnist")
BUNDLED_T2I_MODEL = os.path.join(MODELS, "pixnerd-t2i-fashion-mnist")
BUNDLED_LORA = os.path.join(MODELS, "pixnerd-t2i-fashion-mnist-red-lora")
# The prompts of `make demo` for the bundled text-to-image model (wordings it was not trained on) and its LoRA.
BUNDLED_T2I_PROMPTS = [
    "an image showing a dress",
    "here is a sneaker, centered",
    "a pair of trousers seen from the front",
    "clothing catalogue: a handbag",
    "a low-resolution shot of an ankle boot",
]
BUNDLED_LORA_PROMPTS = ["a red dress", "here is a red sneaker, centered", "a red handbag", "a photo of a red coat"]


def caption_font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def labelled_grid(images: list[Image.Image], captions: list[str], columns: int, cell: int) -> Image.Image:
    """Images scaled to `cell` pixels (nearest, so small images stay sharp) with a caption under each."""
    font = caption_font(max(10, cell // 9))
    caption_height = font.size + 8 if hasattr(font, "size") else 20
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * cell, rows * (cell + caption_height)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_height)
        scaled = image.resize((cell, round(cell * image.height / image.width)), Image.NEAREST).crop((0, 0, cell, cell))
        grid.paste(scaled, (x, y))
        text = caption if draw.textlength(caption, font=font) <= cell - 4 else caption[: max(1, cell // 8)] + "..."
        draw.text((x + cell / 2, y + cell + 4), text, fill="black", font=font, anchor="ma")
    return grid


def headed(grid: Image.Image, title: str) -> Image.Image:
    """`grid` under a line of text (its font made smaller until the line fits)."""
    band = 34
    out = Image.new("RGB", (grid.width, grid.height + band), "white")
    out.paste(grid, (0, band))
    draw = ImageDraw.Draw(out)
    size = 18
    while size > 8 and draw.textlength(title, font=caption_font(size)) > grid.width - 8:
        size -= 1
    draw.text((grid.width / 2, band / 2), title, fill="black", font=caption_font(size), anchor="mm")
    return out


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 24) -> Image.Image:
    out = Image.new("RGB", (left.width + gap + right.width, max(left.height, right.height)), "white")
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out


def sampler_title(pipe, kwargs: dict, seconds: float, count: int) -> str:
    """ "4 steps, no CFG, Euler: 0.4 s for 20 images": the call's settings, else the scheduler's defaults."""
    config = pipe.scheduler.config
    steps = kwargs.get("num_inference_steps") or config.get("num_inference_steps")
    guidance = kwargs.get("guidance_scale") or config.get("guidance_scale")
    solver = "Euler" if config.get("solver_order") == 1 else "Adams-2"
    cfg = f"CFG {guidance:g}" if guidance > 1 else "no CFG"
    return f"{steps} steps, {cfg}, {solver}: {seconds:.1f} s for {count} images"


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUNDLED_MODEL, help="Pipeline folder, Hub repo id or official .ckpt.")
    parser.add_argument("--prompt", nargs="+", default=None, help="Text-to-image prompts.")
    parser.add_argument(
        "--class_labels", nargs="+", default=None, help="Class names or ids (default: every class, up to 10)."
    )
    parser.add_argument("--num_images_per_label", type=int, default=None, help="Default: 4 (bundled) or 1.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the model's setting.")
    parser.add_argument("--guidance_scale", type=float, default=None)
    parser.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("MIN", "MAX"))
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--lora", default=None, help="LoRA weights (folder, file or Hub repo).")
    parser.add_argument("--lora_scale", type=float, default=1.0, help="The LoRA scale (`set_adapters`).")
    parser.add_argument("--cache", default=None, help="NAME[:key=value,...], e.g. first_block:threshold=0.2.")
    parser.add_argument("--compile", default="none", choices=["none", "regional", "full"])
    parser.add_argument(
        "--beside_default",
        action="store_true",
        help="With --lora: the grid beside the model's own with its saved sampler, both headed with their times.",
    )
    parser.add_argument("--output", default="outputs/demo_grid.png")
    return parser.parse_args(input_args)


def main(args):
    pipe = load_pipeline(
        args.model,
        dtype=getattr(torch, args.dtype),
        device=args.device,
        lora=args.lora,
        lora_scale=args.lora_scale if args.lora else None,
        cache=args.cache or None,
        compile=args.compile,
    )
    text = isinstance(pipe, PixNerdT2IPipeline)
    if text:
        if not args.prompt and os.path.abspath(args.model) == os.path.abspath(BUNDLED_T2I_MODEL):
            lora = args.lora and os.path.abspath(args.lora) == os.path.abspath(BUNDLED_LORA)
            args.prompt = BUNDLED_LORA_PROMPTS if lora else BUNDLED_T2I_PROMPTS
        if not args.prompt:
            raise ValueError("This is a text-to-image model: pass `--prompt`.")
        conditions, captions = args.prompt, args.prompt
    else:
        if args.prompt:
            raise ValueError("This is a class-conditional model: pass `--class_labels`, not `--prompt`.")
        names = dict(sorted((int(k), v.split(",")[0].strip()) for k, v in (pipe.config.id2label or {}).items()))
        labels = args.class_labels or list(names)[:10] or list(range(min(10, pipe.transformer.config.num_classes)))
        conditions = [int(label) if str(label).isdigit() else label for label in labels]
        captions = [names.get(c, str(c)) if isinstance(c, int) else c for c in conditions]
    bundled = os.path.abspath(args.model) in (os.path.abspath(BUNDLED_MODEL), os.path.abspath(BUNDLED_T2I_MODEL))
    per_label = args.num_images_per_label or (4 if bundled else 1)
    # One generator per image, so every image depends only on its seed, not on the batch.
    generator = [torch.Generator().manual_seed(args.seed + i) for i in range(len(conditions) * per_label)]
    kwargs = dict(
        height=args.height,
        width=args.width,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        num_images_per_prompt=per_label,
        generator=generator,
    )

    def render(pipe, **call_kwargs) -> tuple[Image.Image, float]:
        """The labelled grid of one call (fresh generators: the same seeds) and its sampling time."""
        call_kwargs["generator"] = [torch.Generator().manual_seed(args.seed + i) for i in range(len(generator))]
        start = time.perf_counter()
        images = (
            pipe(prompt=conditions, **call_kwargs) if text else pipe(class_labels=conditions, **call_kwargs)
        ).images
        seconds = time.perf_counter() - start
        # Columns: the images of one label; rows: labels.
        columns_first = [images[row * per_label + col] for col in range(per_label) for row in range(len(conditions))]
        labels = [captions[row] for _ in range(per_label) for row in range(len(conditions))]
        cell = max(96, min(256, images[0].width))
        return labelled_grid(columns_first, labels, columns=len(conditions), cell=cell), seconds

    grid, seconds = render(pipe, **kwargs)
    if args.beside_default:
        if not args.lora:
            raise ValueError("`--beside_default` compares a LoRA's grid with the model's own: pass `--lora`.")
        base = load_pipeline(args.model, dtype=getattr(torch, args.dtype), device=args.device)
        default = {**kwargs, "num_inference_steps": None, "guidance_scale": None, "guidance_interval": None}
        base_grid, base_seconds = render(base, **default)
        count = len(generator)
        grid = side_by_side(
            headed(base_grid, "model alone: " + sampler_title(base, default, base_seconds, count)),
            headed(grid, "with the LoRA: " + sampler_title(pipe, kwargs, seconds, count)),
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    grid.save(args.output)
    print(f"Wrote {os.path.abspath(args.output)}")
    return args.output


if __name__ == "__main__":
    main(parse_args())
