"""How tests/diffusers_mixins runs: apart from `pytest tests`, skipped with the reason without a diffusers checkout,
refused with a clear error for a folder that is not one. Each check is one short pytest subprocess."""

import glob
import os
import subprocess
import sys

from ..helpers import ROOT as REPO


def run_pytest(*args: str, diffusers_src: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DIFFUSERS_SRC"}
    if diffusers_src is not None:
        env["DIFFUSERS_SRC"] = diffusers_src
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_without_a_checkout_the_mixins_are_one_test_skipped_with_the_reason():
    result = run_pytest("-q", "-rs", "tests/diffusers_mixins")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "1 skipped" in out
    assert "DIFFUSERS_SRC is not set" in out and "make test-mixins DIFFUSERS_SRC=" in out


def test_a_folder_without_diffusers_tests_is_a_usage_error(tmp_path):
    result = run_pytest("-q", "tests/diffusers_mixins", diffusers_src=str(tmp_path))
    assert result.returncode == 4, result.stdout + result.stderr  # pytest's ExitCode.USAGE_ERROR
    assert f"DIFFUSERS_SRC='{tmp_path}' has no tests/testing_utils.py" in result.stderr


def test_the_main_run_does_not_collect_the_mixins():
    # Every test module of tests/ and of its unit folders left out: what remains to collect would come from
    # diffusers_mixins.
    units = [f"--ignore={folder}" for folder in glob.glob(f"{REPO}/tests/*/") if "diffusers_mixins" not in folder]
    result = run_pytest("--collect-only", "-q", "tests", f"--ignore-glob={REPO}/tests/test_*.py", *units)
    out = result.stdout + result.stderr
    assert result.returncode == 5, out  # pytest's ExitCode.NO_TESTS_COLLECTED
    assert "diffusers_mixins" not in out
