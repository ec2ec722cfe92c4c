"""Tiny PixNerd configurations and components shared by the mixin test modules of this folder."""

import importlib.util
import os

import torch

# The tiny configurations and the real Qwen3 tokenizer of the repository's own tests (tests/conftest.py), loaded
# under another module name: this folder has a conftest.py of its own, and `tests` is diffusers' package here.
_spec = importlib.util.spec_from_file_location(
    "pixnerd_tests_conftest", os.path.join(os.path.dirname(__file__), "..", "conftest.py")
)
_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests)
TINY_C2I, TINY_T2I, qwen3_tokenizer = _tests.TINY_C2I, _tests.TINY_T2I, _tests.qwen3_tokenizer

# A random Qwen3 with the real vocabulary, so that the real tokenizer's ids fit; its width is the transformer's
# `text_embed_dim`.
TINY_QWEN3 = dict(
    vocab_size=151680,
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
SIZE = 16  # sample_size: the height and width of the dummy inputs


def tiny_qwen3():
    """A random tiny Qwen3 text encoder, the same on every call (seed 0)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    return Qwen3Model(Qwen3Config(**TINY_QWEN3)).eval()


def has_nonzero_output_layer(transformer) -> bool:
    """Whether the conftest patch gave the neural field's output projection non-zero weights (see conftest.py)."""
    return bool(transformer.neural_field.proj_out.weight.abs().sum() > 0)
