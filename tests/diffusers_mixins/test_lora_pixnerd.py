"""diffusers' `PeftLoraLoaderMixinTests` (tests/lora/utils.py) on both PixNerd pipelines, whose LoRA loader
(`PixNerdLoraLoaderMixin`) is diffusers' transformer-only `SanaLoraLoaderMixin`: wired as diffusers'
tests/lora/test_lora_layers_sana.py and test_lora_layers_lumina2.py wire it."""

import unittest

import torch
from peft import LoraConfig
from pixnerd_mixin_utils import SIZE, TINY_C2I, TINY_T2I, has_nonzero_output_layer, qwen3_tokenizer, tiny_qwen3
from tests.lora.utils import PeftLoraLoaderMixinTests
from tests.testing_utils import floats_tensor, require_peft_backend

from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdPipeline, PixNerdT2IPipeline, PixNerdTransformer2DModel

NO_TEXT_ENCODER = (
    "the mixin asserts on `pipe.text_encoder`, which the class-conditional pipeline has not; PixNerdT2ILoRATests runs "
    "it on the same loader"
)
TEXT_ENCODER_ADAPTER = (
    "the mixin adds a LoRA to `pipe.text_encoder` whatever `supports_text_encoder_loras` says (diffusers xfails it on "
    "CPU): the class-conditional pipeline has no text encoder and PixNerd's LoRA loader is transformer-only"
)
BLOCK_SCALE = "Not supported by PixNerd (as in diffusers' Sana/Lumina2 tests): per-block LoRA scales are UNet-only"


class PixNerdLoRATesterConfig:
    """The mixin builds its components from `*_cls`/`*_kwargs` and Hub checkpoints of a text encoder and a VAE; PixNerd
    has no VAE and a local tokenizer, so `get_dummy_components` is overridden with the same signature and return."""

    scheduler_cls = PixNerdFlowMatchScheduler
    scheduler_kwargs = {"num_inference_steps": 2, "guidance_scale": 3.0}
    transformer_cls = PixNerdTransformer2DModel
    vae_cls = None
    supports_text_encoder_loras = False  # the loader is transformer-only, as Sana's

    def get_dummy_components(self, scheduler_cls=None, use_dora=False, lora_alpha=None):
        scheduler_cls = scheduler_cls if scheduler_cls is not None else self.scheduler_cls
        rank = 4
        lora_alpha = rank if lora_alpha is None else lora_alpha

        torch.manual_seed(0)
        transformer = self.transformer_cls(**self.transformer_kwargs)
        assert has_nonzero_output_layer(transformer)  # see conftest.py
        components = {"transformer": transformer, "scheduler": scheduler_cls(**self.scheduler_kwargs)}
        components.update(self.get_text_components())

        text_lora_config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            target_modules=self.text_encoder_target_modules,
            init_lora_weights=False,
            use_dora=use_dora,
        )
        denoiser_lora_config = LoraConfig(
            r=rank,
            lora_alpha=lora_alpha,
            target_modules=self.denoiser_target_modules,
            init_lora_weights=False,
            use_dora=use_dora,
        )
        return components, text_lora_config, denoiser_lora_config

    def get_text_components(self) -> dict:
        return {}

    @property
    def output_shape(self):
        return (1, SIZE, SIZE, 3)

    @unittest.skip(TEXT_ENCODER_ADAPTER)
    def test_get_adapters(self):
        pass

    @unittest.skip(BLOCK_SCALE)
    def test_simple_inference_with_text_denoiser_block_scale(self):
        pass

    @unittest.skip(BLOCK_SCALE)
    def test_simple_inference_with_text_denoiser_block_scale_for_all_dict_options(self):
        pass


@require_peft_backend
class PixNerdLoRATests(PixNerdLoRATesterConfig, unittest.TestCase, PeftLoraLoaderMixinTests):
    pipeline_class = PixNerdPipeline
    transformer_kwargs = TINY_C2I

    @unittest.skip(NO_TEXT_ENCODER)
    def test_simple_inference_with_text_lora_unloaded(self):
        pass

    @unittest.skip(NO_TEXT_ENCODER)
    def test_simple_inference_with_text_denoiser_lora_unloaded(self):
        pass

    def get_dummy_inputs(self, with_generator=True):
        generator = torch.manual_seed(0)
        noise = floats_tensor((1, 3, SIZE, SIZE))
        pipeline_inputs = {
            "class_labels": [1],
            "num_inference_steps": 2,
            "guidance_scale": 3.0,
            "output_type": "np",
        }
        if with_generator:
            pipeline_inputs.update({"generator": generator})
        return noise, None, pipeline_inputs


@require_peft_backend
class PixNerdT2ILoRATests(PixNerdLoRATesterConfig, unittest.TestCase, PeftLoraLoaderMixinTests):
    pipeline_class = PixNerdT2IPipeline
    transformer_kwargs = TINY_T2I

    def get_text_components(self) -> dict:
        return {"text_encoder": tiny_qwen3(), "tokenizer": qwen3_tokenizer()}

    def get_dummy_inputs(self, with_generator=True):
        sequence_length = TINY_T2I["text_max_length"]
        generator = torch.manual_seed(0)
        noise = floats_tensor((1, 3, SIZE, SIZE))
        input_ids = torch.randint(1, sequence_length, size=(1, sequence_length), generator=generator)
        pipeline_inputs = {
            "prompt": "A painting of a squirrel eating a burger",
            "negative_prompt": "",
            "num_inference_steps": 2,
            "guidance_scale": 3.0,
            "height": SIZE,
            "width": SIZE,
            "max_sequence_length": sequence_length,
            "output_type": "np",
        }
        if with_generator:
            pipeline_inputs.update({"generator": generator})
        return noise, input_ids, pipeline_inputs
