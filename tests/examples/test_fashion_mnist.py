"""examples/fashion_mnist.py: the training captions and the held-out prompt sets kept apart, the concept looks and
their scores, and the data prerequisite shown with the Fashion-MNIST commands of the docs."""

import os
import sys

import numpy as np
import PIL.Image
import pytest

from ..helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
import fashion_mnist  # noqa: E402

# ------------------------------------------------------------------------------------------------ captions and prompts


def test_captions_for_training_and_the_held_out_prompts():
    rng = np.random.default_rng(0)
    training = {fashion_mnist.caption(i % 10, rng) for i in range(5000)}
    held_out = {row["prompt"] for row in fashion_mnist.heldout_prompts(1000)}
    assert len(training) == 10 * 3 * len(fashion_mnist.CAPTION_TEMPLATES)  # every wording of every class
    assert not training & held_out
    fragments = [p.strip(" ,:") for t in fashion_mnist.HELDOUT_TEMPLATES for p in t.split("{}") if p.strip(" ,:")]
    assert not any(f in c for f in fragments for c in training)  # no held-out wording in any training caption
    assert fashion_mnist.caption(9, np.random.default_rng(1), ["{}"], prefix="red") in {
        "a red ankle boot", "a red boot", "a red short boot"
    }  # fmt: skip
    gray = np.full((2, 4, 4), 200, np.uint8)
    assert fashion_mnist.redness(np.repeat(gray[..., None], 3, -1)) == 0.0
    assert fashion_mnist.redness(fashion_mnist.tint_red(gray)) == pytest.approx(0.8 * 200 / 255, abs=0.01)


def test_training_wordings_never_use_a_held_out_wording():
    """The held-out prompts test new sentences: no training wording (basic or varied) contains a held-out one's
    distinctive words."""
    assert len(set(fashion_mnist.VARIED_TEMPLATES)) == 400
    for template in fashion_mnist.CAPTION_TEMPLATES + fashion_mnist.VARIED_TEMPLATES:
        assert template.count("{}") == 1
        assert template not in fashion_mnist.HELDOUT_TEMPLATES
        assert not [word for word in fashion_mnist.HELDOUT_WORDS if word in template], template
    for template in fashion_mnist.HELDOUT_TEMPLATES:  # and each held-out wording has one of those words
        assert [word for word in fashion_mnist.HELDOUT_WORDS if word in template], template


def test_rich_captions_and_the_everyday_prompts_are_apart():
    """The rich training captions vary noun forms and lengths; the second held-out set (everyday wordings) shares the
    noun forms but none of its sentence fragments appears in any training caption (only the bare "{}" frame does)."""
    rng = np.random.default_rng(0)
    rich = [fashion_mnist.rich_caption(i % 10, rng) for i in range(20000)]
    assert len(set(rich)) > 15000
    assert {"coats", "a coat", "the coat", "two coats", "coat"} <= {
        fashion_mnist.noun_form(4, rng) for _ in range(200)
    }
    assert any(c[0].isupper() for c in rich) and any(c.endswith(".") for c in rich)
    fragments = [p.strip(" ,:.") for t in fashion_mnist.EVERYDAY_TEMPLATES for p in t.split("{}") if p.strip(" ,:.")]
    assert len(fragments) == 10  # every template but the bare "{}" has its own words (the long ones two)
    training = rich + fashion_mnist.VARIED_TEMPLATES + fashion_mnist.CAPTION_TEMPLATES
    assert not [(f, c) for f in fragments for c in training if f.lower() in c.lower()]
    assert not [c for c in rich if any(word in c.lower() for word in fashion_mnist.HELDOUT_WORDS)]
    everyday = fashion_mnist.everyday_prompts(1000)
    assert [row["label"] for row in everyday[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert everyday == fashion_mnist.everyday_prompts(1000)  # seeded
    texts = [row["prompt"].lower() for row in everyday]
    assert all(any(t.startswith(s) or s in t for s in ("stock", "image of", "monochrome", "vintage", "generate",
                                                       "wardrobe", "sketch", "namely")) or len(t.split()) <= 4
               for t in texts)  # fmt: skip
    with pytest.raises(ValueError, match="--prefix"):
        fashion_mnist.write_prompts(fashion_mnist.parse_args(["prompts", "--set", "everyday", "--prefix", "red"]))


# ------------------------------------------------------------------------------------------------------------ concepts


def test_blueness_measures_the_blue_tint():
    import fashion_mnist
    import numpy as np

    gray = np.full((2, 4, 4), 200, np.uint8)
    assert fashion_mnist.blueness(np.repeat(gray[..., None], 3, -1)) == 0.0
    blue = fashion_mnist.tint_blue(gray)
    assert blue[0, 0, 0].tolist() == [40, 40, 200]
    assert fashion_mnist.blueness(blue) == pytest.approx(0.8 * 200 / 255, abs=0.01)
    assert fashion_mnist.blueness(fashion_mnist.tint_red(gray)) == pytest.approx(-0.4 * 200 / 255, abs=0.01)


def garment_images():
    """The web demo's 4 sample garments (Fashion-MNIST test images, 32x32), flipped and turned: 16 grayscale uint8
    images (N, 32, 32)."""
    import glob

    import numpy as np

    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "edit_samples", "*.png")))
    images = np.stack([np.asarray(PIL.Image.open(path).convert("L")) for path in paths])
    return np.ascontiguousarray(
        np.concatenate([images, images[:, ::-1], images[:, :, ::-1], np.rot90(images, 1, (1, 2))])
    )


def test_each_concept_score_measures_its_own_look_and_the_look_can_be_undone():
    import fashion_mnist
    import numpy as np

    images = garment_images()
    plain = np.repeat(images[..., None], 3, -1)
    for name, concept in fashion_mnist.CONCEPTS.items():
        look, score = concept["look"](images), concept["score"]
        with_look = np.array([score(x[None]) for x in look])
        without = np.array([score(x[None]) for x in plain])
        assert with_look.min() > 0.1 and abs(without.mean()) < 0.02, (name, with_look.min(), without.mean())
        assert (without > 0.05 * with_look.mean()).mean() <= 0.1, name  # a plain garment rarely passes the leak bar
        if concept["undo"] is not None:  # the classifier sees the garment as it was (up to the tint's rounding)
            assert np.abs(concept["undo"](look).astype(int) - plain).max() <= 1, name
    assert fashion_mnist.inversion(fashion_mnist.invert(images[:3])) == 1.0
    rng = np.random.default_rng(0)
    assert fashion_mnist.caption(4, rng, ["{}"], "inverted").startswith("an inverted ")


def test_the_backgrounds_of_the_masked_example_lie_outside_the_mask():
    import fashion_mnist
    import numpy as np

    images = garment_images()
    looks = fashion_mnist.tint_blue(images)
    placed = fashion_mnist.on_backgrounds(looks, images, seed=0)
    masks = fashion_mnist.item_masks(images)
    assert np.array_equal(placed[masks], looks[masks])  # the garment as it was
    assert placed[~masks].mean() > 60 and looks[~masks].max() <= 10  # a background where there was black


# ---------------------------------------------------------------------------------------------------------------- docs


@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md", "docs/training.md", "docs/results.md"])
def test_the_fashion_mnist_commands_come_with_their_data_prerequisite(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        blocks = f.read().split("```")[1::2]  # the fenced code blocks
    preparing = [block for block in blocks if "fashion_mnist.py prepare" in block]
    assert preparing, f"{page} shows no Fashion-MNIST command"
    for block in preparing:
        assert "apt-get install dataset-fashion-mnist" in block and "/usr/share/datasets/fashion-mnist/" in block
