"""benchmarks/benchmark_official_sampling.py: the comparison of our sampler with the official one."""

import os
import sys

import pytest
import torch

from ..helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_official_sampling_compare_reports_the_difference_of_the_two_samplers():
    import benchmark_official_sampling

    ours, official = torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.5])
    result = benchmark_official_sampling.compare(lambda: ours, lambda: (official,), repeats=2, device="cpu")
    assert result["max_rel_diff"] == pytest.approx(0.5 / 2.5)
    assert result["ours_s"] >= 0 and result["official_s"] >= 0
