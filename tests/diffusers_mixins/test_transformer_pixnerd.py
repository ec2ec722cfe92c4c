"""diffusers' model tester mixins (tests/models/testing_utils) on `PixNerdTransformer2DModel`, wired as diffusers'
tests/models/transformers/test_models_transformer_sana.py wires them for Sana: a config class per variant
(class-conditional, text-to-image) and one test class per mixin.
"""

import functools

import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor
from pixnerd_mixin_utils import SIZE, TINY_C2I, TINY_T2I, has_nonzero_output_layer
from tests.models.testing_utils import (
    AttentionBackendTesterMixin,
    AttentionTesterMixin,
    BaseModelTesterConfig,
    FasterCacheTesterMixin,
    FirstBlockCacheTesterMixin,
    LayerwiseCastingTesterMixin,
    LoraHotSwappingForModelTesterMixin,
    LoraTesterMixin,
    MagCacheTesterMixin,
    MemoryTesterMixin,
    ModelTesterMixin,
    PyramidAttentionBroadcastTesterMixin,
    TaylorSeerCacheTesterMixin,
    TorchCompileTesterMixin,
    TrainingTesterMixin,
)
from tests.testing_utils import enable_full_determinism, slow, torch_device

from diffusers_pixnerd import PixNerdTransformer2DModel

enable_full_determinism()

# Classes that run on the CPU the mixin tests diffusers gates to accelerators; an accelerator runs the originals.
ON_CPU_ONLY = pytest.mark.skipif(torch_device != "cpu", reason="an accelerator runs diffusers' own gated class")


def copied(func, *marks):
    """A mixin test function under a new function object, so that marks added here stay off the mixin's own."""

    @functools.wraps(func)
    def test(*args, **kwargs):
        return func(*args, **kwargs)

    for mark in marks:
        test = mark(test)
    return test


class PixNerdC2ITransformerTesterConfig(BaseModelTesterConfig):
    @property
    def model_class(self):
        return PixNerdTransformer2DModel

    @property
    def main_input_name(self) -> str:
        return "hidden_states"

    @property
    def output_shape(self) -> tuple:
        return (3, SIZE, SIZE)

    @property
    def input_shape(self) -> tuple:
        return (3, SIZE, SIZE)

    @property
    def generator(self):
        return torch.Generator("cpu").manual_seed(0)

    def get_init_dict(self) -> dict:
        return dict(TINY_C2I)

    def get_dummy_inputs(self, height: int = SIZE, width: int = SIZE) -> dict:
        generator = self.generator
        hidden_states = randn_tensor((2, 3, height, width), generator=generator, device=torch.device(torch_device))
        return {
            "hidden_states": hidden_states,
            "timestep": torch.tensor([700.0, 300.0], device=torch_device),  # sigma * 1000
            "class_labels": torch.tensor([1, TINY_C2I["num_classes"]], device=torch_device),  # a class, the null class
        }


class PixNerdT2ITransformerTesterConfig(PixNerdC2ITransformerTesterConfig):
    def get_init_dict(self) -> dict:
        return dict(TINY_T2I)

    def get_dummy_inputs(self, height: int = SIZE, width: int = SIZE) -> dict:
        generator = self.generator
        device = torch.device(torch_device)
        hidden_states = randn_tensor((2, 3, height, width), generator=generator, device=device)
        text_shape = (2, TINY_T2I["text_max_length"], TINY_T2I["text_embed_dim"])
        return {
            "hidden_states": hidden_states,
            "timestep": torch.tensor([700.0, 300.0], device=torch_device),
            "encoder_hidden_states": randn_tensor(text_shape, generator=generator, device=device),
        }


# ---------------------------------------------------------------------------------------------------------- common


class TestPixNerdC2ITransformer(PixNerdC2ITransformerTesterConfig, ModelTesterMixin):
    def test_output_is_not_trivially_zero(self, base_model_output):
        # Not a mixin test: guards every comparison above against the all-zero output of the official init.
        torch.manual_seed(0)
        assert has_nonzero_output_layer(self.model_class(**self.get_init_dict()))
        assert base_model_output.abs().max() > 1e-3


class TestPixNerdT2ITransformer(PixNerdT2ITransformerTesterConfig, ModelTesterMixin):
    def test_output_is_not_trivially_zero(self, base_model_output):
        torch.manual_seed(0)
        assert has_nonzero_output_layer(self.model_class(**self.get_init_dict()))
        assert base_model_output.abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------- attention


class TestPixNerdC2ITransformerAttention(PixNerdC2ITransformerTesterConfig, AttentionTesterMixin):
    pass


class TestPixNerdT2ITransformerAttention(PixNerdT2ITransformerTesterConfig, AttentionTesterMixin):
    pass


class TestPixNerdC2ITransformerAttentionBackend(PixNerdC2ITransformerTesterConfig, AttentionBackendTesterMixin):
    pass


class TestPixNerdT2ITransformerAttentionBackend(PixNerdT2ITransformerTesterConfig, AttentionBackendTesterMixin):
    pass


# ------------------------------------------------------------------------------------------------------------ LoRA


class TestPixNerdC2ITransformerLoRA(PixNerdC2ITransformerTesterConfig, LoraTesterMixin):
    pass


class TestPixNerdT2ITransformerLoRA(PixNerdT2ITransformerTesterConfig, LoraTesterMixin):
    pass


class TestPixNerdC2ITransformerLoRAHotSwap(PixNerdC2ITransformerTesterConfig, LoraHotSwappingForModelTesterMixin):
    pass


class TestPixNerdT2ITransformerLoRAHotSwap(PixNerdT2ITransformerTesterConfig, LoraHotSwappingForModelTesterMixin):
    pass


def _hotswap_on_cpu():
    m = LoraHotSwappingForModelTesterMixin
    return {
        "different_shapes_for_compilation": None,
        "setup_method": m.setup_method,
        "teardown_method": m.teardown_method,
        "_get_lora_config": m._get_lora_config,
        "_get_linear_module_name_other_than_attn": m._get_linear_module_name_other_than_attn,
        "_check_model_hotswap": m._check_model_hotswap,
        # The tests without torch.compile (the class is gated to accelerators as a whole).
        "test_hotswapping_model": copied(m.test_hotswapping_model),
        "test_enable_lora_hotswap_called_after_adapter_added_raises": copied(
            m.test_enable_lora_hotswap_called_after_adapter_added_raises
        ),
        "test_enable_lora_hotswap_called_after_adapter_added_warning": copied(
            m.test_enable_lora_hotswap_called_after_adapter_added_warning
        ),
        "test_enable_lora_hotswap_called_after_adapter_added_ignore": copied(
            m.test_enable_lora_hotswap_called_after_adapter_added_ignore
        ),
        "test_enable_lora_hotswap_wrong_check_compiled_argument_raises": copied(
            m.test_enable_lora_hotswap_wrong_check_compiled_argument_raises
        ),
    }


@ON_CPU_ONLY
class TestPixNerdC2ITransformerLoRAHotSwapOnCPU(PixNerdC2ITransformerTesterConfig):
    locals().update(_hotswap_on_cpu())


@ON_CPU_ONLY
class TestPixNerdT2ITransformerLoRAHotSwapOnCPU(PixNerdT2ITransformerTesterConfig):
    locals().update(_hotswap_on_cpu())


# ---------------------------------------------------------------------------------------------------------- memory


class TestPixNerdC2ITransformerMemory(PixNerdC2ITransformerTesterConfig, MemoryTesterMixin):
    pass


class TestPixNerdT2ITransformerMemory(PixNerdT2ITransformerTesterConfig, MemoryTesterMixin):
    pass


@ON_CPU_ONLY
class TestPixNerdC2ITransformerLayerwiseCastingOnCPU(PixNerdC2ITransformerTesterConfig, LayerwiseCastingTesterMixin):
    pass


@ON_CPU_ONLY
class TestPixNerdT2ITransformerLayerwiseCastingOnCPU(PixNerdT2ITransformerTesterConfig, LayerwiseCastingTesterMixin):
    pass


# GroupOffloadTesterMixin is not run on the CPU: every one of its tests offloads with `use_stream=True`, which
# diffusers refuses for a CPU onload device ("requires an onload device whose backend implements streams").


# -------------------------------------------------------------------------------------------------------- training


class TestPixNerdC2ITransformerTraining(PixNerdC2ITransformerTesterConfig, TrainingTesterMixin):
    def test_gradient_checkpointing_is_applied(self):
        super().test_gradient_checkpointing_is_applied(expected_set={"PixNerdTransformer2DModel"})


class TestPixNerdT2ITransformerTraining(PixNerdT2ITransformerTesterConfig, TrainingTesterMixin):
    def test_gradient_checkpointing_is_applied(self):
        super().test_gradient_checkpointing_is_applied(expected_set={"PixNerdTransformer2DModel"})


def _training_on_cpu():
    m = TrainingTesterMixin
    names = [
        "setup_method",
        "teardown_method",
        "test_training",
        "test_training_with_ema",
        "test_gradient_checkpointing",
        "test_gradient_checkpointing_equivalence",
        # Not test_mixed_precision_training: it autocasts only on accelerators, on the CPU it would run nothing.
    ]
    tests = {name: copied(getattr(m, name)) if name.startswith("test_") else getattr(m, name) for name in names}

    def test_gradient_checkpointing_is_applied(self):
        m.test_gradient_checkpointing_is_applied(self, expected_set={"PixNerdTransformer2DModel"})

    tests["test_gradient_checkpointing_is_applied"] = test_gradient_checkpointing_is_applied
    return tests


@ON_CPU_ONLY
class TestPixNerdC2ITransformerTrainingOnCPU(PixNerdC2ITransformerTesterConfig):
    locals().update(_training_on_cpu())


@ON_CPU_ONLY
class TestPixNerdT2ITransformerTrainingOnCPU(PixNerdT2ITransformerTesterConfig):
    locals().update(_training_on_cpu())


# --------------------------------------------------------------------------------------------------- torch.compile

# Other resolutions than the trained 16x16: multiples of the patch (class-conditional) or of the 4x4 token grid (text
# model, which decodes them from the trained token grid with larger neural-field patches).
# Not opted in (None skips `test_compile_on_different_shapes`): a new resolution recompiles, because the RoPE
# positions are `torch.linspace` over the token grid exactly as in the official code, and linspace specialises on its
# length under dynamic shapes. The `arange * step` that would compile once moves positions by ~1 ulp; we keep the
# official numerics and accept one compile per resolution (docs/transformer.md).
DIFFERENT_SHAPES = None
# The text model's repeated block class also makes up its text refiner, called without RoPE and text keys (as
# diffusers' Z-Image test raises the limit for its refiners built from the main block class): two graphs.
T2I_RECOMPILE_LIMIT = 2


class TestPixNerdC2ITransformerCompile(PixNerdC2ITransformerTesterConfig, TorchCompileTesterMixin):
    different_shapes_for_compilation = DIFFERENT_SHAPES


class TestPixNerdT2ITransformerCompile(PixNerdT2ITransformerTesterConfig, TorchCompileTesterMixin):
    different_shapes_for_compilation = DIFFERENT_SHAPES

    def test_torch_compile_repeated_blocks(self):
        super().test_torch_compile_repeated_blocks(recompile_limit=T2I_RECOMPILE_LIMIT)


def _compile_on_cpu(recompile_limit=1):
    m = TorchCompileTesterMixin

    def test_torch_compile_repeated_blocks(self):
        m.test_torch_compile_repeated_blocks(self, recompile_limit=recompile_limit)

    test_torch_compile_repeated_blocks.__doc__ = m.test_torch_compile_repeated_blocks.__doc__
    # Inductor on 2 shared CPU cores takes a minute a test: RUN_SLOW=1 runs these.
    return {
        "different_shapes_for_compilation": DIFFERENT_SHAPES,
        "setup_method": m.setup_method,
        "teardown_method": m.teardown_method,
        "test_torch_compile_recompilation_and_graph_break": copied(
            m.test_torch_compile_recompilation_and_graph_break, slow
        ),
        "test_torch_compile_repeated_blocks": slow(test_torch_compile_repeated_blocks),
        "test_compile_on_different_shapes": copied(m.test_compile_on_different_shapes, slow),
    }


@ON_CPU_ONLY
class TestPixNerdC2ITransformerCompileOnCPU(PixNerdC2ITransformerTesterConfig):
    locals().update(_compile_on_cpu())


@ON_CPU_ONLY
class TestPixNerdT2ITransformerCompileOnCPU(PixNerdT2ITransformerTesterConfig):
    locals().update(_compile_on_cpu(recompile_limit=T2I_RECOMPILE_LIMIT))


# ---------------------------------------------------------------------------------------------------------- caches


class TestPixNerdC2ITransformerPABCache(PixNerdC2ITransformerTesterConfig, PyramidAttentionBroadcastTesterMixin):
    pass


class TestPixNerdT2ITransformerPABCache(PixNerdT2ITransformerTesterConfig, PyramidAttentionBroadcastTesterMixin):
    pass


class TestPixNerdC2ITransformerFBCache(PixNerdC2ITransformerTesterConfig, FirstBlockCacheTesterMixin):
    pass


class TestPixNerdT2ITransformerFBCache(PixNerdT2ITransformerTesterConfig, FirstBlockCacheTesterMixin):
    pass


class TestPixNerdC2ITransformerMagCache(PixNerdC2ITransformerTesterConfig, MagCacheTesterMixin):
    pass


class TestPixNerdT2ITransformerMagCache(PixNerdT2ITransformerTesterConfig, MagCacheTesterMixin):
    pass


class TestPixNerdC2ITransformerTaylorSeerCache(PixNerdC2ITransformerTesterConfig, TaylorSeerCacheTesterMixin):
    pass


class TestPixNerdT2ITransformerTaylorSeerCache(PixNerdT2ITransformerTesterConfig, TaylorSeerCacheTesterMixin):
    pass


FASTER_CACHE_REFUSED = (
    "PixNerd refuses FasterCache by design (models/cache.py UNSUPPORTED_CACHES): it approximates the unconditional "
    "half of one batched [uncond, cond] call, but PixNerd's pipelines call each guidance branch separately"
)


def _faster_cache_refused():
    names = [name for name in dir(FasterCacheTesterMixin) if name.startswith("test_")]
    return {
        name: pytest.mark.skip(reason=FASTER_CACHE_REFUSED)(copied(getattr(FasterCacheTesterMixin, name)))
        for name in names
    }


class TestPixNerdC2ITransformerFasterCache(PixNerdC2ITransformerTesterConfig, FasterCacheTesterMixin):
    locals().update(_faster_cache_refused())

    def test_faster_cache_is_refused_with_the_reason(self):
        # Not a mixin test: the refusal itself.
        model = self.model_class(**self.get_init_dict())
        with pytest.raises(ValueError, match="FasterCacheConfig is not supported by PixNerd"):
            model.enable_cache(self._get_cache_config())


class TestPixNerdT2ITransformerFasterCache(PixNerdT2ITransformerTesterConfig, FasterCacheTesterMixin):
    locals().update(_faster_cache_refused())

    def test_faster_cache_is_refused_with_the_reason(self):
        model = self.model_class(**self.get_init_dict())
        with pytest.raises(ValueError, match="FasterCacheConfig is not supported by PixNerd"):
            model.enable_cache(self._get_cache_config())
