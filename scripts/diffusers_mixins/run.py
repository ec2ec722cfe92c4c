"""Runs diffusers' own generic test mixins against diffusers-pixnerd's classes.

The test modules in this folder subclass the mixins of a diffusers checkout (`tests/` of
github.com/huggingface/diffusers, never copied here) the way diffusers' own tests wire them for Sana, DiT and Lumina2:

- `test_transformer_pixnerd.py`: `ModelTesterMixin` and the split model mixins of `tests/models/testing_utils`
  (attention, attention backends, LoRA, LoRA hot-swapping, memory / group offloading / layerwise casting, training,
  torch.compile, the cache mixins) on `PixNerdTransformer2DModel`, class-conditional and text-to-image.
- `test_pipeline_pixnerd.py`, `test_pipeline_pixnerd_t2i.py`: `PipelineTesterMixin` (and the pipeline-level cache
  mixins) on `PixNerdPipeline` and `PixNerdT2IPipeline`.
- `test_lora_pixnerd.py`: `PeftLoraLoaderMixinTests` (tests/lora/utils.py) on both pipelines.
- `test_scheduler_pixnerd.py`: `SchedulerCommonTest` on `PixNerdFlowMatchScheduler`.

Usage (from the repository root, with the project's virtual environment):

    mkdir -p /tmp/diffusers_tests
    git --git-dir=<diffusers mirror or clone>/.git archive HEAD tests | tar -x -C /tmp/diffusers_tests
    python scripts/diffusers_mixins/run.py --diffusers_tests /tmp/diffusers_tests [pytest args]

`--diffusers_tests` is the folder that holds diffusers' `tests/` package (a full diffusers clone works too: its `src/`
is NOT put on the path, the installed diffusers is tested). Extra arguments go to pytest, e.g. `-k T2I`, `-x`, `-rs`
(the reasons of the skips), or test files / node ids of this folder. The mixins import two test-only packages that the
project does not depend on, `parameterized` and `requests_mock`; install them in the environment, or with
`pip install --target <diffusers_tests>/_deps parameterized requests-mock`: a `_deps` folder beside `tests/` is put on
the path too. Slow tests (torch.compile on the CPU) run only with `RUN_SLOW=1`, as in diffusers.

On a machine without an accelerator the mixin tests that need one (fp16 inference, model CPU offload, device maps over
GPU 0, CUDA streams, attention kernels) are skipped by diffusers' own `require_*` marks; the training, layerwise
casting, LoRA hot-swapping (without compile) and compile tests, which diffusers gates to accelerators but which run on
the CPU, are also run here on the CPU (classes `...OnCPU`), and those classes skip themselves where an accelerator
runs the originals. About 2 minutes on 2 CPU cores; RUN_SLOW=1 adds about 4 minutes of CPU torch.compile.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--diffusers_tests",
        required=True,
        help="folder holding diffusers' `tests/` package (e.g. /tmp/diffusers_tests)",
    )
    args, pytest_args = parser.parse_known_args(argv)

    root = os.path.abspath(args.diffusers_tests)
    if os.path.basename(root) == "tests" and os.path.isfile(os.path.join(root, "testing_utils.py")):
        root = os.path.dirname(root)  # the `tests` folder itself was given
    if not os.path.isfile(os.path.join(root, "tests", "testing_utils.py")):
        parser.error(f"{root} has no tests/testing_utils.py: pass the folder that contains diffusers' `tests/`.")

    # conftest.py reads this to put the checkout (and its `_deps`) on sys.path, also when pytest is run directly.
    os.environ["PIXNERD_DIFFUSERS_TESTS"] = root
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import pytest

    # This folder's test modules, unless test files or node ids of it were given.
    targets = [] if any(os.path.exists(arg.split("::")[0]) for arg in pytest_args) else [HERE]
    return pytest.main(
        [
            *targets,
            "-c",
            os.path.join(HERE, "pytest.ini"),  # not the repository's pyproject.toml settings
            "--rootdir",
            HERE,
            *pytest_args,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
