"""scripts/scale_lora.py: an adapter weight baked into a LoRA file."""

import os
import sys

import pytest
import torch

from diffusers_pixnerd import load_pipeline

from ..helpers import BUNDLED_LORA, BUNDLED_T2I, ROOT

sys.path.insert(0, os.path.join(ROOT, "scripts"))


def test_scale_lora_bakes_an_adapter_weight_into_the_file(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import scale_lora

    assert scale_lora.scale_lora(BUNDLED_LORA, 0.5, str(tmp_path / "half")) > 0
    assert sorted(os.listdir(tmp_path / "half")) == sorted(os.listdir(BUNDLED_LORA))  # card, images copied
    prompts = ["a red dress", "here is a red sneaker, centered"]

    def sample(lora, weight):
        pipe = load_pipeline(BUNDLED_T2I, lora=lora)
        pipe.set_adapters(pipe.get_active_adapters(), weight)
        pipe.set_progress_bar_config(disable=True)
        generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
        return pipe(prompts, num_inference_steps=4, generator=generators, output_type="latent").images

    baked, weighted, full = sample(tmp_path / "half", 1.0), sample(BUNDLED_LORA, 0.5), sample(BUNDLED_LORA, 1.0)
    torch.testing.assert_close(baked, weighted, rtol=1e-4, atol=1e-4)
    assert (baked - full).abs().max() > 0.1
    with pytest.raises(ValueError, match="holds no pytorch_lora_weights.safetensors"):
        scale_lora.scale_lora(str(tmp_path), 0.5, str(tmp_path / "x"))
