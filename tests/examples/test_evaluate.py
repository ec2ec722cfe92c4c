"""examples/evaluate.py: FID, precision/recall and class accuracy on samples of the bundled model, the cache option,
the reference features cached once."""

import json
import os
import sys

import numpy as np
import pytest
import torch

from diffusers_pixnerd import load_pipeline

from ..helpers import BUNDLED, CLASSIFIER, ROOT

sys.path.insert(0, os.path.join(ROOT, "examples"))
import evaluate  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def test_class_accuracy_averages_larger_samples_down_to_the_classifier_size():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import evaluate

    classifier = os.path.join(ROOT, "models", "fashion-mnist-classifier.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    labels = list(range(10)) * 2
    at_32 = evaluate.class_accuracy(classifier, images, labels)
    at_64 = evaluate.class_accuracy(classifier, images.repeat(2, axis=1).repeat(2, axis=2), labels)
    assert at_64 == at_32
    assert evaluate.parse_args(["--model", "m", "--resolution", "64"]).resolution == 64


def test_evaluate_with_a_cache_records_it_and_skips_work(tmp_path):
    common = ["--model", BUNDLED, "--num_samples", "10", "--batch_size", "10", "--num_inference_steps", "20"]
    plain = evaluate.main(evaluate.parse_args([*common, "--output_dir", str(tmp_path / "plain")]))
    cached = evaluate.main(
        evaluate.parse_args([*common, "--cache", "first_block:threshold=0.1", "--output_dir", str(tmp_path / "fbc")])
    )
    assert (plain["cache"], cached["cache"]) == (None, "first_block:threshold=0.1")
    assert cached["sampling_seconds"] > 0
    a, b = (np.load(tmp_path / name / "samples.npz")["arr_0"].astype(np.float32) for name in ("plain", "fbc"))
    assert 0 < np.abs(a - b).mean() < 10  # an approximation of the same images, not other images


def test_frechet_distance_of_gaussians():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 8))
    b = rng.standard_normal((4000, 8)) + np.array([2.0] + [0.0] * 7)
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # Same covariance, means 2 apart: FID = |mu_a - mu_b|^2 = 4 (up to sampling error).
    assert evaluate.frechet_distance(a, b) == pytest.approx(4.0, abs=0.3)


def test_precision_recall_of_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((200, 4))
    assert evaluate.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert evaluate.precision_recall(real, real + 100.0) == (0.0, 0.0)


def test_class_balanced_labels():
    labels = evaluate.class_balanced_labels(25, 10)
    assert labels[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert np.bincount(labels).tolist() == [3, 3, 3, 3, 3, 2, 2, 2, 2, 2]


def test_inception_features_of_the_same_images_agree():
    features = evaluate.InceptionFeatures()
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    pool, spatial = features(images, batch_size=2)
    assert pool.shape == (3, 2048) and spatial.shape == (3, 7 * 17 * 17)
    pool_again, _ = features(images[::-1].copy(), batch_size=3)
    np.testing.assert_allclose(pool_again[::-1], pool, rtol=1e-4, atol=1e-4)
    assert np.abs(pool[0] - pool[1]).max() > 1e-3


def test_evaluate_samples_and_scores_class_accuracy(tmp_path):
    args = evaluate.parse_args(
        ["--model", BUNDLED, "--num_samples", "20", "--batch_size", "10", "--num_inference_steps", "10",
         "--classifier", CLASSIFIER, "--output_dir", str(tmp_path)]
    )  # fmt: skip
    metrics = evaluate.main(args)
    samples = np.load(tmp_path / "samples.npz")
    assert samples["arr_0"].shape == (20, 32, 32, 3) and samples["arr_0"].dtype == np.uint8
    assert samples["arr_1"].tolist() == [i % 10 for i in range(20)]
    # The accuracy is the classifier's on these very samples (docs/results.md has the measured figure).
    from fashion_mnist import load_classifier

    pixels = torch.from_numpy(samples["arr_0"]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        correct = load_classifier(CLASSIFIER)(pixels).argmax(-1).numpy() == samples["arr_1"]
    assert metrics["class_accuracy"] == pytest.approx(correct.mean())
    names = json.load(open(os.path.join(BUNDLED, "model_index.json")))["id2label"]
    expected = {names[str(c)]: correct[c::10].mean() for c in range(10)}  # two samples per class
    assert metrics["per_class_accuracy"] == pytest.approx(expected)
    # Per-index seeds: sample 3 alone is the same image as in the batch.
    pipe = load_pipeline(BUNDLED, dtype=torch.float32)
    alone = pipe(
        class_labels=[3], num_inference_steps=10, generator=[torch.Generator().manual_seed(3)], output_type="np"
    )
    np.testing.assert_allclose(np.round(alone.images[0] * 255), samples["arr_0"][3], atol=1)


def test_reference_features_are_computed_once_into_the_cache(tmp_path):
    reference = tmp_path / "real.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    calls = []

    def features(images):
        calls.append(len(images))
        return images.reshape(len(images), -1)[:, :4].astype(np.float64), images.reshape(len(images), -1)[:, 4:6]

    first = evaluate.reference_features(features, str(reference), 5, str(tmp_path / "cache"))
    again = evaluate.reference_features(features, str(reference), 5, str(tmp_path / "cache"))
    assert calls == [5] and all(np.array_equal(a, b) for a, b in zip(first, again))
    evaluate.reference_features(features, str(reference), 6, str(tmp_path / "cache"))  # another count: computed
    assert calls == [5, 6] and sorted(os.listdir(tmp_path / "cache")) == ["real_npz-5.npz", "real_npz-6.npz"]
