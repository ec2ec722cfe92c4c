"""Tiny PixNerd configurations and components shared by the mixin test modules of this folder."""

import importlib.util
import os

# The tiny configurations and the real Qwen3 tokenizer of the repository's own tests (tests/conftest.py), loaded
# under another module name: this folder has a conftest.py of its own, and `tests` is diffusers' package here.
_spec = importlib.util.spec_from_file_location(
    "pixnerd_tests_conftest", os.path.join(os.path.dirname(__file__), "..", "conftest.py")
)
_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests)
TINY_C2I, TINY_T2I, qwen3_tokenizer = _tests.TINY_C2I, _tests.TINY_T2I, _tests.qwen3_tokenizer

SIZE = 16  # sample_size: the height and width of the dummy inputs


def tiny_qwen3():
    """The tests' tiny random Qwen3 (seed 0), as wide as the transformer's `text_embed_dim`."""
    width = TINY_T2I["text_embed_dim"]
    return _tests.tiny_qwen3({**_tests.TINY_QWEN3, "hidden_size": width, "intermediate_size": 2 * width})


def has_nonzero_output_layer(transformer) -> bool:
    """Whether the conftest patch gave the neural field's output projection non-zero weights (see conftest.py)."""
    return bool(transformer.neural_field.proj_out.weight.abs().sum() > 0)
