"""pytest settings and the fixtures every test folder shares. The tiny model configurations (`TINY_C2I`, `TINY_T2I`,
`TINY_QWEN3`, `randomize_`, `tiny_qwen3`, `qwen3_tokenizer`) live in `diffusers_pixnerd.testing_utils`, the plain
test helpers in helpers.py."""

import importlib.util
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub, which reads it once

import pytest
import torch

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdT2IPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I, qwen3_tokenizer, randomize_, tiny_qwen3

from .helpers import CLASSES, TINY_MODEL, save_image, tiny_dinov2

torch.set_num_threads(min(2, torch.get_num_threads()))

# diffusers' own test mixins run apart, from a diffusers checkout, under their own rootdir and settings:
# `make test-mixins DIFFUSERS_SRC=...` (see diffusers_mixins/conftest.py).
collect_ignore = ["diffusers_mixins"]


@pytest.fixture(autouse=True)
def keeps_diffusers_attention_default():
    """A test that leaves diffusers' global attention backend changed (`set_attention_backend` sets it) would make every
    later in-process run compute differently from a fresh process: fail that test and put the default back."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    before = _AttentionBackendRegistry._active_backend
    yield
    after = _AttentionBackendRegistry._active_backend
    if after != before:
        _AttentionBackendRegistry._active_backend = before
        pytest.fail(f"the test left diffusers' global attention backend at {after} (was {before})")


@pytest.fixture(scope="module")
def single_thread():
    """The tiny models run fastest on one thread: a thread pool costs more than it saves (and far more on a busy
    machine). Test modules of tiny models use it for all their tests: `pytestmark = pytest.mark.usefixtures(...)`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------- tiny models


@pytest.fixture
def tiny_c2i():
    from diffusers_pixnerd import PixNerdTransformer2DModel

    torch.manual_seed(0)
    return randomize_(PixNerdTransformer2DModel(**TINY_C2I)).eval()


@pytest.fixture
def tiny_t2i():
    from diffusers_pixnerd import PixNerdTransformer2DModel

    torch.manual_seed(0)
    return randomize_(PixNerdTransformer2DModel(**TINY_T2I)).eval()


# ------------------------------------------------------------- the training scripts: tests/training and tests/examples


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Image folders in every supported layout, a tiny DINOv2, a tiny model config and a tiny T2I pipeline."""
    import datasets

    root = tmp_path_factory.mktemp("assets")
    # Class folders: one image per class (odd sizes, cropped to 16) and an unreadable file, so every epoch of a
    # 2 x 2 batch meets it.
    for label, name in enumerate(CLASSES):
        save_image(root / "classes" / name / "0.png", 20 + 4 * label, 17, seed=label)
    (root / "classes" / "dog" / "broken.png").write_bytes(b"this is not an image")
    # A "Hub" dataset with other column names: 6 images in parquet.
    paths = []
    for i in range(6):
        save_image(root / "hub_images" / f"{i}.png", 16, 16 + 2 * i, seed=10 + i)
        paths.append(str(root / "hub_images" / f"{i}.png"))
    table = datasets.Dataset.from_dict({"img": paths, "cls": [0, 1, 2, 0, 1, 2]}).cast_column("img", datasets.Image())
    os.makedirs(root / "hub")
    table.to_parquet(str(root / "hub" / "train.parquet"))
    # Captions: the official layout (a .txt beside each image) and metadata.jsonl.
    rows = []
    for i, caption in enumerate(["a red square", "a blue circle", "green noise", "a cat on a mat"]):
        save_image(root / "captions_txt" / f"{i}.jpg", 24, 20 + 4 * i, seed=20 + i)
        (root / "captions_txt" / f"{i}.txt").write_text(caption)
        save_image(root / "captions_jsonl" / "images" / f"{i}.png", 20 + 4 * i, 24, seed=30 + i)
        rows.append(json.dumps({"file_name": f"images/{i}.png", "text": caption}))
    (root / "captions_jsonl" / "metadata.jsonl").write_text("\n".join(rows))
    tiny_dinov2().save_pretrained(root / "dinov2")
    (root / "tiny.json").write_text(json.dumps(TINY_MODEL))
    torch.manual_seed(0)
    PixNerdT2IPipeline(
        transformer=randomize_(PixNerdTransformer2DModel(**TINY_T2I)),
        scheduler=PixNerdFlowMatchScheduler(num_inference_steps=2, guidance_scale=3.0),
        text_encoder=tiny_qwen3(),
        tokenizer=qwen3_tokenizer(),
    ).save_pretrained(root / "t2i_pipeline")
    return root


@pytest.fixture
def run_main(monkeypatch, tmp_path):
    """Runs a script's `main(parse_args(args))` in this process (for the failure paths: fast, exceptions visible)."""
    from accelerate.state import AcceleratorState, GradientState

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(script, args):
        spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], script)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        return module.main(module.parse_args([str(a) for a in args]))

    yield run
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.set_num_threads(threads)


@pytest.fixture
def not_launched(monkeypatch):
    for name in ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
