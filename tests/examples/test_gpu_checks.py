"""benchmarks/gpu_checks.py, run on the CPU with `--smoke`: the cache-sampling check on random pipelines."""

import json
import os
import sys

import torch

from ..helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_gpu_checks_cache_sampling_runs_the_benchmark_on_random_pipelines(monkeypatch, tmp_path):
    import gpu_checks

    for name, preset in gpu_checks.SMOKE_PRESETS.items():  # what `--smoke` adds, undone after the test
        monkeypatch.setitem(gpu_checks.PIXNERD_PRESETS, name, preset)
    args = gpu_checks.parse_args(["--smoke", "--device", "cpu", "--checks", "cache_sampling"])
    rec = gpu_checks.Recorder(str(tmp_path / "result.json"))
    with torch.no_grad():
        gpu_checks.check_cache_sampling(args, rec)
    rows = json.loads((tmp_path / "result.json").read_text())["rows"]
    assert list(rows) == args.cache_variants and all(row["status"] == "ok" for row in rows.values())
    assert rows["cache=taylorseer:cache_interval=3"]["max_pixel_diff"] == 0  # 2 steps: both computed in full
    assert all(row["none_min_s"] > 0 and 0 <= row["max_pixel_diff"] <= 255 for row in rows.values())
