"""diffusers' speed and memory paths on PixNerdTransformer2DModel: attention processors and backends, QKV fusion,
layerwise casting, quantized loading, regional compile. Outputs are compared by value on models whose neural-field
output layer is non-zero (the official initialisation zeroes it, so a fresh model outputs zeros)."""

import pytest
import torch

from diffusers_pixnerd import PixNerdTransformer2DModel
from diffusers_pixnerd.models.transformer_pixnerd import PixNerdAttnProcessor
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I

# ---------------------------------------------------------------------------------------------------- attention layout


def model_with_output(config: dict, seed: int = 0) -> PixNerdTransformer2DModel:
    torch.manual_seed(seed)
    model = PixNerdTransformer2DModel(**config).eval()
    torch.nn.init.normal_(model.neural_field.proj_out.weight, std=0.2)
    return model


@pytest.mark.parametrize("config", [TINY_C2I, TINY_T2I], ids=["c2i", "t2i"])
def test_attention_has_diffusers_names_and_processors(config):
    model = model_with_output(config)
    attention = model.transformer_blocks[0].attn
    for name in ("to_q", "to_k", "to_v", "norm_q", "norm_k"):
        assert isinstance(getattr(attention, name), torch.nn.Module)
    assert isinstance(attention.to_out[0], torch.nn.Linear)
    assert hasattr(attention, "add_k_proj") == model.is_text_conditional
    blocks = config["num_layers"] + config.get("num_text_refiner_layers", 0) * model.is_text_conditional
    assert len(model.attn_processors) == blocks
    assert all(isinstance(p, PixNerdAttnProcessor) for p in model.attn_processors.values())


def inputs(model: PixNerdTransformer2DModel, batch: int = 2, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    size = model.config.sample_size
    kwargs = {
        "hidden_states": torch.randn(batch, 3, size, size, generator=generator),
        "timestep": torch.tensor([700.0, 250.0][:batch]),
    }
    if model.is_text_conditional:
        shape = (batch, model.config.text_max_length, model.config.text_embed_dim)
        kwargs["encoder_hidden_states"] = torch.randn(*shape, generator=generator)
    else:
        kwargs["class_labels"] = torch.arange(batch)
    return kwargs


def run(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).sample


def test_set_attn_processor_replaces_the_computation():
    model = model_with_output(TINY_T2I)
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    calls = []

    class Counting(PixNerdAttnProcessor):
        def __call__(self, attn, *args, **kwargs):
            calls.append(attn)
            return super().__call__(attn, *args, **kwargs)

    model.set_attn_processor(Counting())
    torch.testing.assert_close(run(model, **kwargs), expected)
    assert len(calls) == len(model.attn_processors)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_attention_backend_really_switches_the_kernel(monkeypatch):
    from diffusers.models import attention_dispatch

    model = model_with_output(TINY_T2I)
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    seen = []
    math_backend = attention_dispatch._AttentionBackendRegistry._backends[
        attention_dispatch.AttentionBackendName._NATIVE_MATH
    ]

    def spy(*args, **kw):
        seen.append("math")
        return math_backend(*args, **kw)

    monkeypatch.setitem(
        attention_dispatch._AttentionBackendRegistry._backends,
        attention_dispatch.AttentionBackendName._NATIVE_MATH,
        spy,
    )
    # set_attention_backend also makes the backend diffusers' global default: put the default back after the test
    # (left at the math kernel, later models in this process would compute differently from a fresh process).
    registry = attention_dispatch._AttentionBackendRegistry
    monkeypatch.setattr(registry, "_active_backend", registry._active_backend)
    model.set_attention_backend("_native_math")
    got = run(model, **kwargs)
    assert len(seen) == len(model.attn_processors)  # every attention went through the chosen kernel
    assert relative_error(got, expected) < 1e-5
    with pytest.raises(RuntimeError, match="flash"):  # not installed here: a real switch fails loudly
        model.set_attention_backend("flash")


@pytest.mark.parametrize("config", [TINY_C2I, TINY_T2I], ids=["c2i", "t2i"])
def test_fuse_qkv_projections_keeps_the_output(config):
    model = model_with_output(config)
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    model.fuse_qkv_projections()
    attention = model.transformer_blocks[0].attn
    assert attention.fused_projections and hasattr(attention, "to_qkv")
    assert hasattr(attention, "to_added_kv") == model.is_text_conditional
    assert relative_error(run(model, **kwargs), expected) < 1e-6
    model.unfuse_qkv_projections()
    assert not hasattr(attention, "to_qkv") and not hasattr(attention, "to_added_kv")
    torch.testing.assert_close(run(model, **kwargs), expected)


def test_diffusers_default_lora_targets_apply():
    from peft import LoraConfig

    model = model_with_output(TINY_T2I)
    kwargs = inputs(model)
    before = run(model, **kwargs)
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"to_q", "to_k", "to_v", "0"}
    assert relative_error(run(model, **kwargs), before) > 1e-3


# ---------------------------------------------------------------------------------------------- dtype and quantization


def test_compute_dtype_follows_layerwise_casting_not_a_stored_weight():
    from diffusers.hooks import apply_layerwise_casting

    model = model_with_output(TINY_C2I)
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    # Every layer, the patch embedding included, stored in float8: the compute dtype stays float32.
    apply_layerwise_casting(model, torch.float8_e4m3fn, torch.float32, skip_modules_pattern=())
    assert model.patch_embed.weight.dtype == torch.float8_e4m3fn and model.dtype == torch.float32
    got = run(model, **kwargs)
    assert got.dtype == torch.float32
    assert relative_error(got, expected) < 0.1


def test_layerwise_casting_to_fp8_keeps_the_bundled_model_close():
    model = PixNerdTransformer2DModel.from_pretrained("models/pixnerd-fashion-mnist/transformer")
    generator = torch.Generator().manual_seed(0)
    kwargs = {
        "hidden_states": torch.randn(4, 3, 32, 32, generator=generator),
        "timestep": torch.tensor([900.0, 600.0, 300.0, 100.0]),
        "class_labels": torch.tensor([0, 3, 7, 9]),
    }
    expected = run(model, **kwargs)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    assert model.neural_field.proj_out.weight.dtype == torch.float32  # in `_skip_layerwise_casting_patterns`
    assert relative_error(run(model, **kwargs), expected) < 0.02  # measured 0.010


def test_quantized_loading_with_torchao(tmp_path):
    from diffusers import TorchAoConfig
    from torchao.quantization import Int8WeightOnlyConfig

    model = model_with_output(TINY_T2I).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    kwargs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs(model).items()}
    expected = run(model, **kwargs)
    quantized = PixNerdTransformer2DModel.from_pretrained(
        tmp_path, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.bfloat16
    )
    weight = quantized.transformer_blocks[0].attn.to_q.weight
    assert type(weight).__name__ != "Parameter" or weight.dtype == torch.int8  # a quantized tensor
    got = run(quantized, **kwargs)
    assert got.dtype == torch.bfloat16
    assert 0 < relative_error(got, expected) < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward_is_close_to_float32(dtype):
    model = model_with_output(TINY_T2I)
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}
    got = run(model.to(dtype), **half)
    assert got.dtype == dtype
    assert relative_error(got, expected) < 0.03


# ---------------------------------------------------------------------------------------------------- regional compile


def test_compile_repeated_blocks_compiles_each_dit_block():
    model = model_with_output(TINY_T2I)
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    blocks = list(model.transformer_blocks) + list(model.text_refiner_blocks)
    assert all(type(b).__name__ in model._repeated_blocks for b in blocks)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    torch.testing.assert_close(run(model, **kwargs), expected)
