"""diffusers' own generic test mixins, run on diffusers-pixnerd's classes from a diffusers source checkout.

    make test-mixins DIFFUSERS_SRC=/path/to/diffusers        # or, with the test-only packages installed:
    DIFFUSERS_SRC=/path/to/diffusers python -m pytest -rs tests/diffusers_mixins [-k T2I] [-x]

The test modules of this folder subclass the mixins of diffusers' `tests/` package (github.com/huggingface/diffusers,
never copied here) the way diffusers' own tests wire them for Sana, DiT and Lumina2:

- `test_transformer_pixnerd.py`: `ModelTesterMixin` and the split model mixins of `tests/models/testing_utils`
  (attention, attention backends, LoRA, LoRA hot-swapping, memory / group offloading / layerwise casting, training,
  torch.compile, the cache mixins) on `PixNerdTransformer2DModel`, class-conditional and text-to-image.
- `test_pipeline_pixnerd.py`, `test_pipeline_pixnerd_t2i.py`: `PipelineTesterMixin` (and the pipeline-level cache
  mixins) on `PixNerdPipeline` and `PixNerdT2IPipeline`.
- `test_lora_pixnerd.py`: `PeftLoraLoaderMixinTests` (tests/lora/utils.py) on both pipelines.
- `test_scheduler_pixnerd.py`: `SchedulerCommonTest` on `PixNerdFlowMatchScheduler`.

`DIFFUSERS_SRC` is a diffusers clone (or the folder holding its `tests/`, or that `tests/` folder). Only its `tests/`
is used: the installed diffusers is the one under test, not the checkout's `src/`. Unset, those modules are not
collected and `test_diffusers_checkout.py` reports one test skipped with the reason. The mixins import two test-only
packages the project does not depend on, `parameterized` and `requests_mock` (`make test-mixins` installs them).

Why a folder of its own: diffusers' test package is named `tests`, as is this repository's test folder. This folder's
`pytest.ini` makes it the rootdir whenever pytest is pointed at it, so the repository's `tests/conftest.py` and its
pyproject settings are not loaded, and the checkout is put first on `sys.path`; the repository's `tests/conftest.py`
in turn keeps `pytest tests` out of this folder (`collect_ignore`).

On a machine without an accelerator the mixin tests that need one (fp16 inference, model CPU offload, device maps over
GPU 0, CUDA streams, attention kernels) are skipped by diffusers' own `require_*` marks; the training, layerwise
casting, LoRA hot-swapping (without compile) and compile tests, which diffusers gates to accelerators but which run on
the CPU, are also run here on the CPU (classes `...OnCPU`), and those classes skip themselves where an accelerator
runs the originals. About 2 to 3 minutes on 2 CPU cores; RUN_SLOW=1 adds about 4 minutes of CPU torch.compile.
"""

import importlib.util
import os
import sys

import pytest

SKIP_REASON = (
    "DIFFUSERS_SRC is not set: the diffusers mixin tests need a diffusers source checkout, e.g. "
    "`make test-mixins DIFFUSERS_SRC=/path/to/diffusers` (see tests/diffusers_mixins/conftest.py)"
)
TEST_ONLY_PACKAGES = ("parameterized", "requests_mock")


def find_diffusers_tests(value: str | None) -> str | None:
    """The folder holding diffusers' `tests/` package that `DIFFUSERS_SRC` names, or None when it is unset or empty."""
    if not value:
        return None
    root = os.path.realpath(os.path.expanduser(value))
    if os.path.basename(root) == "tests" and os.path.isfile(os.path.join(root, "testing_utils.py")):
        root = os.path.dirname(root)  # the `tests` folder itself was given
    if not os.path.isfile(os.path.join(root, "tests", "testing_utils.py")):
        raise pytest.UsageError(
            f"DIFFUSERS_SRC={value!r} has no tests/testing_utils.py: expected a diffusers source checkout (a clone of "
            "github.com/huggingface/diffusers, or the folder holding its `tests/`)."
        )
    missing = [name for name in TEST_ONLY_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise pytest.UsageError(
            f"The diffusers test mixins import the test-only packages {' and '.join(TEST_ONLY_PACKAGES)}; missing: "
            f"{', '.join(missing)}. Install them with `pip install parameterized requests-mock` (`make test-mixins` "
            "does it)."
        )
    return root


try:
    DIFFUSERS_TESTS, _setup_error = find_diffusers_tests(os.environ.get("DIFFUSERS_SRC")), None
except pytest.UsageError as error:
    DIFFUSERS_TESTS, _setup_error = None, error  # raised by pytest_configure: a plain usage error, not a traceback
_diffusers_conftest = None

if DIFFUSERS_TESTS is None:
    # The mixin modules import diffusers' `tests` package at import time: without a checkout they are not collected,
    # and test_diffusers_checkout.py says why.
    collect_ignore_glob = ["test_*pixnerd*.py"]
else:
    sys.path.insert(0, DIFFUSERS_TESTS)
    # diffusers' tests/conftest.py: its markers, `--make-reports` and its warning filter. It also puts the checkout's
    # `src/` first on the path (to test a diffusers clone's own source); here the installed diffusers is under test,
    # so that entry is taken out again.
    _before = list(sys.path)
    import tests.conftest as _diffusers_conftest  # noqa: E402

    sys.path[:] = [p for p in sys.path if p in _before]


def pytest_addoption(parser):
    if _diffusers_conftest is not None:
        _diffusers_conftest.pytest_addoption(parser)


def pytest_configure(config):
    if _setup_error is not None:
        raise _setup_error
    if _diffusers_conftest is None:
        return
    _diffusers_conftest.pytest_configure(config)
    # Marks diffusers' testing_utils applies without registering them in its conftest.
    for name in ("cache", "autoround"):
        config.addinivalue_line("markers", f"{name}: diffusers test marker")


def pytest_terminal_summary(terminalreporter):
    if _diffusers_conftest is not None:
        _diffusers_conftest.pytest_terminal_summary(terminalreporter)


def pytest_report_header(config):
    if DIFFUSERS_TESTS is None:
        return ["diffusers tests: none (DIFFUSERS_SRC is not set)"]
    import diffusers
    import tests.testing_utils as diffusers_testing_utils
    import torch

    return [
        f"diffusers tests from: {DIFFUSERS_TESTS}",
        f"installed diffusers {diffusers.__version__} at {os.path.dirname(diffusers.__file__)}",
        f"torch {torch.__version__}, torch_device={diffusers_testing_utils.torch_device}",
    ]


@pytest.fixture(scope="session")
def diffusers_tests() -> str:
    """The folder holding the diffusers checkout's `tests/` package; skips the test, with the reason, without one."""
    if DIFFUSERS_TESTS is None:
        pytest.skip(SKIP_REASON)
    return DIFFUSERS_TESTS


@pytest.fixture(autouse=True, scope="session")
def nonzero_neural_field_output():
    """The official initialisation zeroes `neural_field.proj_out`: a fresh PixNerd model outputs zeros, and every
    comparison of two outputs would pass whatever the code does. Every model built during these tests (directly, by
    `from_pretrained` before its weights load, inside pipelines) draws that layer from N(0, 0.02) instead, from the
    global seed the mixins set (`torch.manual_seed(0)`), so equal seeds still give equal models."""
    if DIFFUSERS_TESTS is None:  # nothing runs; don't import torch for the one skipped test
        yield
        return
    import torch

    from diffusers_pixnerd import PixNerdTransformer2DModel

    initialize_weights = PixNerdTransformer2DModel.initialize_weights

    def nonzero_initialize_weights(self):
        initialize_weights(self)
        torch.nn.init.normal_(self.neural_field.proj_out.weight, std=0.02)

    PixNerdTransformer2DModel.initialize_weights = nonzero_initialize_weights
    try:
        yield
    finally:
        PixNerdTransformer2DModel.initialize_weights = initialize_weights
