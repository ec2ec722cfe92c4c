"""Tiny PixNerd configurations and components shared by the mixin test modules of this folder."""

from diffusers_pixnerd import testing_utils
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I, qwen3_tokenizer  # noqa: F401 - used by the mixin modules

SIZE = 16  # sample_size: the height and width of the dummy inputs


def tiny_qwen3():
    """The tests' tiny random Qwen3 (seed 0), as wide as the transformer's `text_embed_dim`."""
    width = TINY_T2I["text_embed_dim"]
    return testing_utils.tiny_qwen3({**testing_utils.TINY_QWEN3, "hidden_size": width, "intermediate_size": 2 * width})


def has_nonzero_output_layer(transformer) -> bool:
    """Whether the conftest patch gave the neural field's output projection non-zero weights (see conftest.py)."""
    return bool(transformer.neural_field.proj_out.weight.abs().sum() > 0)
