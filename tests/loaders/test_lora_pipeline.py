"""LoRA loading into the pipelines (loaders/lora_pipeline.py): `load_lora_weights`, `fuse_lora`, `unfuse_lora`,
`unload_lora_weights` and `set_adapters` on a LoRA saved in diffusers' format."""

import pytest
import torch

from diffusers_pixnerd import PixNerdPipeline

from ..helpers import TOLERANCE, relative_error, sample, tiny_c2i_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


def add_lora(pipe, seed=1) -> dict:
    """A random LoRA (A and B non-zero) on the attention and neural-field layers; the `save_lora_weights` kwargs."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "param_generator"],
        init_lora_weights=False,
    )
    pipe.transformer.add_adapter(config)
    # The metadata keeps lora_alpha (scale alpha / r = 2); without it diffusers assumes alpha = r.
    return dict(
        transformer_lora_layers=get_peft_model_state_dict(pipe.transformer),
        transformer_lora_adapter_metadata=config.to_dict(),
    )


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    """A LoRA of the tiny C2I transformer in diffusers' format, and the pipeline output with it applied."""
    pipe = tiny_c2i_pipeline()
    folder = tmp_path_factory.mktemp("lora")
    PixNerdPipeline.save_lora_weights(folder, **add_lora(pipe))
    return folder, sample(pipe, [1, 2])


def test_load_lora_weights_changes_output_to_the_adapter_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    original = sample(pipe, [1, 2])
    pipe.load_lora_weights(folder, adapter_name="style")
    loaded = sample(pipe, [1, 2])
    assert relative_error(loaded, with_lora) < TOLERANCE
    assert (loaded - original).abs().max() > 1e-2


def test_fuse_lora_keeps_the_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    pipe.load_lora_weights(folder, adapter_name="style")
    original = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight.clone()
    pipe.fuse_lora()
    fused = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer.weight
    assert (fused - original).abs().max() > 1e-3  # merged into the weights
    assert relative_error(sample(pipe, [1, 2]), with_lora) < TOLERANCE


def test_unfuse_and_unload_lora_restore_the_original_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    original = sample(pipe, [1, 2])
    pipe.load_lora_weights(folder, adapter_name="style")
    pipe.fuse_lora()
    pipe.unfuse_lora()
    assert relative_error(sample(pipe, [1, 2]), with_lora) < TOLERANCE
    pipe.unload_lora_weights()
    assert relative_error(sample(pipe, [1, 2]), original) < TOLERANCE


def test_set_adapters_weight_zero_gives_the_original_output(lora_folder):
    folder, with_lora = lora_folder
    pipe = tiny_c2i_pipeline()
    original = sample(pipe, [1, 2])
    pipe.load_lora_weights(folder, adapter_name="style")
    pipe.set_adapters("style", 0.0)
    assert relative_error(sample(pipe, [1, 2]), original) < TOLERANCE
    pipe.set_adapters("style", 1.0)
    assert relative_error(sample(pipe, [1, 2]), with_lora) < TOLERANCE
