"""Puts a diffusers checkout's `tests/` package on the path (see run.py) and gives the tiny PixNerd models non-zero
outputs.

`PIXNERD_DIFFUSERS_TESTS` is the folder holding diffusers' `tests/` (run.py sets it). Its `_deps` subfolder, if any,
holds the test-only packages the mixins import (`parameterized`, `requests_mock`).
"""

import os
import sys

import pytest
import torch

_ROOT = os.environ.get("PIXNERD_DIFFUSERS_TESTS")
if not _ROOT or not os.path.isfile(os.path.join(_ROOT, "tests", "testing_utils.py")):
    raise pytest.UsageError(
        "Set PIXNERD_DIFFUSERS_TESTS to the folder holding diffusers' `tests/` package, or run "
        "`python scripts/diffusers_mixins/run.py --diffusers_tests <folder>`."
    )
for _path in (os.path.join(_ROOT, "_deps"), _ROOT):
    if os.path.isdir(_path) and _path not in sys.path:
        sys.path.insert(0, _path)

# diffusers' tests/conftest.py: its markers, `--make-reports` and its warning filter. It also puts the checkout's
# `src/` first on the path (to test a diffusers clone's own source); here the installed diffusers is under test, so
# that entry is taken out again.
_before = list(sys.path)
import tests.conftest as _diffusers_conftest  # noqa: E402

sys.path[:] = [p for p in sys.path if p in _before]

import diffusers  # noqa: E402

from diffusers_pixnerd import PixNerdTransformer2DModel  # noqa: E402


def pytest_addoption(parser):
    _diffusers_conftest.pytest_addoption(parser)


def pytest_configure(config):
    _diffusers_conftest.pytest_configure(config)
    # Marks diffusers' testing_utils applies without registering them in its conftest.
    for name in ("cache", "autoround"):
        config.addinivalue_line("markers", f"{name}: diffusers test marker")


def pytest_terminal_summary(terminalreporter):
    _diffusers_conftest.pytest_terminal_summary(terminalreporter)


def pytest_report_header(config):
    import tests.testing_utils as diffusers_testing_utils

    return [
        f"diffusers tests from: {_ROOT}",
        f"installed diffusers {diffusers.__version__} at {os.path.dirname(diffusers.__file__)}",
        f"torch {torch.__version__}, torch_device={diffusers_testing_utils.torch_device}",
    ]


@pytest.fixture(autouse=True, scope="session")
def nonzero_neural_field_output():
    """The official initialisation zeroes `neural_field.proj_out`: a fresh PixNerd model outputs zeros, and every
    comparison of two outputs would pass whatever the code does. Every model built during these tests (directly, by
    `from_pretrained` before its weights load, inside pipelines) draws that layer from N(0, 0.02) instead, from the
    global seed the mixins set (`torch.manual_seed(0)`), so equal seeds still give equal models."""
    initialize_weights = PixNerdTransformer2DModel.initialize_weights

    def nonzero_initialize_weights(self):
        initialize_weights(self)
        torch.nn.init.normal_(self.neural_field.proj_out.weight, std=0.02)

    PixNerdTransformer2DModel.initialize_weights = nonzero_initialize_weights
    try:
        yield
    finally:
        PixNerdTransformer2DModel.initialize_weights = initialize_weights
