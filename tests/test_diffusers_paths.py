"""diffusers' speed and memory paths on the model: attention processors and backends, QKV fusion, the fused layout of
older files, layerwise casting, quantized loading, regional compile. Outputs are compared by value on models whose
neural-field output layer is non-zero (the official initialisation zeroes it, so a fresh model outputs zeros)."""

import pytest
import torch
from conftest import TINY_C2I, TINY_T2I
from safetensors.torch import load_file, save_file

from diffusers_pixnerd import PixNerdTransformer2DModel
from diffusers_pixnerd.models.transformer_pixnerd import PixNerdAttnProcessor

FOLDER_WEIGHTS = "diffusion_pytorch_model.safetensors"


def model_with_output(config: dict, seed: int = 0) -> PixNerdTransformer2DModel:
    torch.manual_seed(seed)
    model = PixNerdTransformer2DModel(**config).eval()
    torch.nn.init.normal_(model.neural_field.proj_out.weight, std=0.2)
    return model


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


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fused_layout(state_dict: dict) -> dict:
    """The inverse of `unfuse_attention_keys` (how diffusers-pixnerd < 0.2 saved its weights), for building old files."""
    fused = {}
    for key, value in state_dict.items():
        if ".attn.to_q." in key:
            k, v = (state_dict[key.replace(".to_q.", name)] for name in (".to_k.", ".to_v."))
            shared = "lora_A" in key
            fused[key.replace(".to_q.", ".to_qkv.")] = value if shared else torch.cat([value, k, v])
        elif ".attn.add_k_proj." in key:
            v = state_dict[key.replace(".add_k_proj.", ".add_v_proj.")]
            fused[key.replace(".add_k_proj.", ".add_kv_proj.")] = value if "lora_A" in key else torch.cat([value, v])
        elif ".attn.to_out.0." in key:
            fused[key.replace(".to_out.0.", ".to_out.")] = value
        elif not any(f".attn.{name}." in key for name in ("to_k", "to_v", "add_v_proj")):
            fused[key] = value
    return fused


# ---------------------------------------------------------------------------------------------- attention layout


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


@pytest.mark.parametrize("config", [TINY_C2I, TINY_T2I], ids=["c2i", "t2i"])
def test_a_folder_in_the_fused_layout_loads_with_the_same_output(config, tmp_path):
    model = model_with_output(config)
    kwargs = inputs(model)
    model.save_pretrained(tmp_path)
    weights = tmp_path / FOLDER_WEIGHTS
    old = fused_layout(load_file(weights))
    assert any(".to_qkv." in k for k in old) and not any(".to_q." in k for k in old)
    save_file(old, weights)
    loaded = PixNerdTransformer2DModel.from_pretrained(tmp_path)
    torch.testing.assert_close(run(loaded, **kwargs), run(model, **kwargs), rtol=0, atol=0)


def test_diffusers_default_lora_targets_apply():
    from peft import LoraConfig

    model = model_with_output(TINY_T2I)
    kwargs = inputs(model)
    before = run(model, **kwargs)
    model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"to_q", "to_k", "to_v", "0"}
    assert relative_error(run(model, **kwargs), before) > 1e-3


def test_a_lora_in_the_fused_layout_loads_exactly(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from test_pipelines import sample, tiny_t2i_pipeline

    from diffusers_pixnerd import PixNerdT2IPipeline

    embeds = {"prompt_embeds": torch.randn(1, 6, 24), "negative_prompt_embeds": torch.randn(1, 6, 24)}
    pipe = tiny_t2i_pipeline()
    targets = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(3)
    pipe.transformer.add_adapter(config)
    with torch.no_grad():  # a LoRA trained on the fused layout has one `lora_A` for q, k, v (and for text k, v)
        for module in pipe.transformer.modules():
            if hasattr(module, "to_q"):
                for name in ("to_k", "to_v"):
                    getattr(module, name).lora_A.default.weight.copy_(module.to_q.lora_A.default.weight)
            if hasattr(module, "add_k_proj"):
                module.add_v_proj.lora_A.default.weight.copy_(module.add_k_proj.lora_A.default.weight)
    with_lora = sample(pipe, **embeds)
    old_config = {**config.to_dict(), "target_modules": ["to_qkv", "to_out", "add_kv_proj"]}
    PixNerdT2IPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=fused_layout(get_peft_model_state_dict(pipe.transformer)),
        transformer_lora_adapter_metadata=old_config,
    )
    saved = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    assert any(".to_qkv.lora_B" in k for k in saved)

    fresh = tiny_t2i_pipeline()
    fresh.load_lora_weights(tmp_path)
    assert relative_error(sample(fresh, **embeds), with_lora) < 1e-5


def test_an_ema_of_a_training_checkpoint_in_the_fused_layout_loads(tmp_path):
    from diffusers_pixnerd.training.checkpoints import fused_layout_parameter_names, load_checkpoint_weights
    from diffusers_pixnerd.training.ema import create_ema, save_ema

    trained, averaged = model_with_output(TINY_T2I, seed=0), model_with_output(TINY_T2I, seed=1)
    old_weights = fused_layout({f"transformer.{k}": v for k, v in trained.state_dict().items()})
    save_file({k: v.contiguous() for k, v in old_weights.items()}, tmp_path / "model.safetensors")
    # The old EMA: its shadow list in the fused layout's parameter order.
    old_averaged = fused_layout(dict(averaged.named_parameters()))
    names = fused_layout_parameter_names(averaged)
    assert sorted(names) == sorted(old_averaged)
    ema = create_ema([torch.nn.Parameter(old_averaged[n].detach().clone()) for n in names])
    save_ema(ema, tmp_path / "ema.safetensors")

    model = model_with_output(TINY_T2I, seed=2)
    kwargs = inputs(model)
    assert load_checkpoint_weights(model, str(tmp_path), use_ema=False) == "trained"
    torch.testing.assert_close(run(model, **kwargs), run(trained, **kwargs), rtol=0, atol=0)
    assert load_checkpoint_weights(model, str(tmp_path)) == "ema"
    torch.testing.assert_close(run(model, **kwargs), run(averaged, **kwargs), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- dtype and quantization


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


# ------------------------------------------------------------------------------------------------ regional compile


def test_compile_repeated_blocks_compiles_each_dit_block():
    model = model_with_output(TINY_T2I)
    kwargs = inputs(model)
    expected = run(model, **kwargs)
    model.compile_repeated_blocks(backend="eager", fullgraph=True)
    blocks = list(model.transformer_blocks) + list(model.text_refiner_blocks)
    assert all(type(b).__name__ in model._repeated_blocks for b in blocks)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)
    torch.testing.assert_close(run(model, **kwargs), expected)
