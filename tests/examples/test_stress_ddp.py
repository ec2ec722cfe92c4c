"""scripts/stress_ddp.py: finding a run's processes (also those left behind by their launcher) and counting the
outcomes. The repeated 2-process runs themselves take minutes and are not run here (docs/training.md)."""

import json
import os
import subprocess
import sys
import time

from ..helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))


def test_a_runs_processes_are_found_by_its_folder_also_without_their_launcher(tmp_path):
    import stress_ddp

    marker = str(tmp_path / "run-0")
    # A launcher that starts a worker in a session of its own (as torch's launcher does) and exits at once.
    worker = f"import time; time.sleep(60)  # {marker}"
    launcher = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True)"
    subprocess.run([sys.executable, "-c", launcher, marker], check=True)
    try:
        for _ in range(50):  # the worker is starting
            found = stress_ddp.run_processes(marker)
            if found:
                break
            time.sleep(0.1)
        assert len(found) == 1 and marker in stress_ddp.command_line(found[0])
        assert stress_ddp.run_processes(str(tmp_path / "run-1")) == []  # another run's folder: none
    finally:
        for pid in stress_ddp.run_processes(marker):
            os.kill(pid, 9)


def test_the_summary_counts_the_outcomes(tmp_path, monkeypatch):
    import stress_ddp

    outcomes = iter(["ended", "hung", "ended", "failed"])
    monkeypatch.setattr(stress_ddp, "make_assets", lambda folder: None)
    monkeypatch.setattr(stress_ddp, "run_once", lambda i, args, assets: {"run": i, "outcome": next(outcomes)})
    args = stress_ddp.parse_args(["--runs", "4", "--output_dir", str(tmp_path), "--", "--no_use_ema"])
    assert stress_ddp.main(args) == 1  # not all ended cleanly
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["runs"], summary["ended"], summary["failed"], summary["hung"]) == (4, 2, 1, 1)
    assert summary["extra"] == ["--no_use_ema"]
