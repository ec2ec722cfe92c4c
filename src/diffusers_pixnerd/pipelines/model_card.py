# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""What a saved pipeline folder holds besides the weights: the model card (README.md) and diffusers' custom-pipeline
file (`pipeline_pixnerd.py`)."""

import os
import re
import shutil

from diffusers.utils import logging
from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData

logger = logging.get_logger(__name__)

EXTRA_START, EXTRA_END = "<!-- model-card-extra:start -->", "<!-- model-card-extra:end -->"
CARD_MARKER = "<!-- Model card written by diffusers-pixnerd: rewritten when the folder is saved again. -->"
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")

# Written beside every saved pipeline: diffusers' custom-pipeline file, so that `DiffusionPipeline.from_pretrained(
# folder_or_repo, custom_pipeline="pipeline_pixnerd", trust_remote_code=True)` loads it without importing this package
# first. It only imports the installed package (`model_index.json` keeps a plain class name, so the package's own
# `from_pretrained` needs no remote code).
LOADER_NAME = "pipeline_pixnerd"
LOADER_FILE = """# diffusers custom-pipeline file of a diffusers-pixnerd folder; it needs `pip install diffusers-pixnerd`:
#     from diffusers import DiffusionPipeline
#     pipe = DiffusionPipeline.from_pretrained(<this folder or repo>, custom_pipeline="{name}", trust_remote_code=True)
from diffusers_pixnerd import {class_name}  # noqa: F401
"""

MODEL_CARD = """
{marker}
# {title}

A [PixNerd](https://arxiv.org/abs/2507.23268) (Pixel Neural Field Diffusion) pipeline for the `diffusers-pixnerd`
package: a diffusion transformer on pixels, no VAE, whose output head is a per-patch neural field (official code:
github.com/MCG-NJU/PixNerd). Install `diffusers-pixnerd`, then:

```py
import torch
from diffusers_pixnerd import {class_name}

pipe = {class_name}.from_pretrained("{repo_id}")
image = pipe({example_input}, generator=torch.Generator().manual_seed(0)).images[0]
```

With the package installed, diffusers alone loads it too, through the `{loader}` file beside the weights:
`DiffusionPipeline.from_pretrained("{repo_id}", custom_pipeline="{loader_name}", trust_remote_code=True)`.

Sampling defaults (scheduler config): {sampling}. Trained resolution {size}x{size}.

<!-- model-card-extra:start -->
{extra}
<!-- model-card-extra:end -->
## Citation

```bibtex
@inproceedings{{wang2026pixnerd,
  title={{PixNerd: Pixel Neural Field Diffusion}},
  author={{Wang, Shuai and Gao, Ziteng and Zhu, Chenhui and Huang, Weilin and Wang, Limin}},
  booktitle={{ICLR}},
  year={{2026}}
}}
```
"""


def pipeline_model_card(
    pipeline, repo_id: str | None = None, extra: str = "", base_model: str | None = None, folder: str | None = None
) -> str:
    """The README.md written beside `pipeline`: library, tags, usage, sampling defaults, the paper; `base_model` (a Hub
    repo id) for a fine-tuned model. The usage loads `repo_id`, else the local `folder` it is saved in (as
    `shown_path` writes it)."""
    text = pipeline.transformer.is_text_conditional
    config = pipeline.scheduler.config
    sampling = ", ".join(
        f"{k} {config[k]}" for k in ("num_inference_steps", "guidance_scale", "shift", "solver_order") if k in config
    )
    body = MODEL_CARD.format(
        marker=CARD_MARKER,
        title=repo_id or f"PixNerd {'text-to-image' if text else 'class-conditional'} pipeline",
        class_name=type(pipeline).__name__,
        loader=f"{LOADER_NAME}.py",
        loader_name=LOADER_NAME,
        repo_id=repo_id or (shown_path(folder) if folder else "path/to/this/folder"),
        example_input='"a red fox in the snow"' if text else "class_labels=[0]",
        sampling=sampling or "see scheduler/scheduler_config.json",
        size=pipeline.transformer.config.sample_size,
        extra=extra,
    )
    task = "text-to-image" if text else "class-conditional-image-generation"
    pipeline_tag = "text-to-image" if text else "unconditional-image-generation"
    return card_text(body, ["pixel-diffusion", task], base_model, pipeline_tag)


def card_text(body: str, tags: list[str], base_model: str | None = None, pipeline_tag: str | None = None) -> str:
    """A model card: `body` (markdown) under the Hub metadata block that diffusers' training scripts write (huggingface_hub's
    `ModelCardData`; the library name and the tags added by diffusers' `populate_model_card`): MIT license, the
    package's tags and `tags`, `base_model` (a Hub repo id) for a fine-tuned model, `pipeline_tag`."""
    data = ModelCardData(license="mit", base_model=base_model, pipeline_tag=pipeline_tag)
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n{{ body }}", body=body)
    return str(populate_model_card(card, ["diffusers-pixnerd", "pixnerd", *tags]))


def write_model_card(folder: str, card: str) -> bool:
    """Writes `card` as `folder/README.md` unless a README.md that is not ours is there: a file the user wrote is
    never overwritten (a warning says so). Ours carry `CARD_MARKER` (or the extra-section markers). Returns whether
    the card was written."""
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            existing = f.read()
        if CARD_MARKER not in existing and EXTRA_START not in existing:
            logger.warning(
                "%s exists and was not written by diffusers-pixnerd: kept as it is, no model card written. Delete "
                "it (or save to another folder) to get the generated card.",
                path,
            )
            return False
    with open(path, "w", encoding="utf-8") as f:
        f.write(card)
    return True


def shown_path(name_or_path: str) -> str:
    """A Hub id or a path as a model card shows it: as given, except an absolute local path, which becomes its last
    component. A card is meant to be shared: where a folder was on the training machine works nowhere else (and may
    name a user), while a relative path or a folder name still tells the reader what to pass."""
    name_or_path = os.fspath(name_or_path)
    return os.path.basename(os.path.normpath(name_or_path)) if os.path.isabs(name_or_path) else name_or_path


def read_model_card_extra(folder: str) -> tuple[str, list[str], str | None]:
    """The extra section (training settings, samples) of our model card in `folder`, the local image files it shows
    and its `base_model`, so that saving or pushing a loaded pipeline keeps them. `("", [], None)` without such a card.
    """
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return "", [], None
    with open(path, encoding="utf-8") as f:
        card = f.read()
    if EXTRA_START not in card or EXTRA_END not in card:
        return "", [], None
    extra = card.split(EXTRA_START, 1)[1].split(EXTRA_END, 1)[0].strip("\n")
    images = [m for m in MARKDOWN_IMAGE.findall(extra) if "://" not in m and os.path.isfile(os.path.join(folder, m))]
    base_model = re.search(r"^base_model: (\S+)$", card.split("\n---", 1)[0], re.MULTILINE)
    return extra, [os.path.join(folder, m) for m in images], base_model.group(1) if base_model else None


def carry_model_card_extra(source: str, save_directory: str) -> tuple[str, str | None]:
    """The extra section and `base_model` of the card in `source` (see `read_model_card_extra`), with the sample
    images it shows copied to the same relative paths in `save_directory`."""
    extra, images, base_model = read_model_card_extra(source)
    for image in images:
        target = os.path.join(save_directory, os.path.relpath(image, source))
        if os.path.abspath(image) != os.path.abspath(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(image, target)
    return extra, base_model


def write_loader_file(folder: str, class_name: str) -> str:
    """Writes `pipeline_pixnerd.py` (see `LOADER_FILE`) into a pipeline folder; returns its path."""
    path = os.path.join(folder, f"{LOADER_NAME}.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(LOADER_FILE.format(name=LOADER_NAME, class_name=class_name))
    return path
