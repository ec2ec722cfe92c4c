"""The package as a whole: its pipelines registered in diffusers' namespace, one version string."""

import os

import pytest

import diffusers_pixnerd
from diffusers_pixnerd import PixNerdPipeline, PixNerdT2IPipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def test_package_registers_pipelines_in_diffusers_namespace():
    import diffusers

    assert diffusers.PixNerdPipeline is PixNerdPipeline and diffusers.PixNerdT2IPipeline is PixNerdT2IPipeline
    assert diffusers_pixnerd.PixNerdTransformer2DModel is diffusers.PixNerdTransformer2DModel


def test_one_version_string():
    import re

    import diffusers_pixnerd

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    setup = open(os.path.join(root, "setup.py"), encoding="utf-8").read()
    assert "version=VERSION" in setup and not re.search(r'version="\d', setup)
    assert diffusers_pixnerd.__version__ == "0.2.0.dev0"
