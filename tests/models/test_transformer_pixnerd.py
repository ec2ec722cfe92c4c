"""PixNerdTransformer2DModel (models/transformer_pixnerd.py and models/pixnerd_blocks.py): parity with the official
implementation, behaviour, any size on the trained or the native grid, bad input and configs that disagree with their
weights."""

import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import (
    PIXNERD_PRESETS,
    PixNerdFlowMatchScheduler,
    PixNerdPipeline,
    PixNerdT2IPipeline,
    PixNerdTransformer2DModel,
)
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I, randomize_

from ..helpers import FIXTURES, tiny_c2i_pipeline

pytestmark = pytest.mark.usefixtures("single_thread")


# -------------------- parity with the official implementation (fixtures from scripts/generate_transformer_fixtures.py)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def to_timestep(t: torch.Tensor) -> torch.Tensor:
    """Official t (0 = noise) -> diffusers timestep sigma * 1000 (exact for the fixture's t values)."""
    return (1 - t) * 1000


@pytest.mark.parametrize("case", ["square", "nonsquare"])
def test_c2i_matches_official(case):
    model = PixNerdTransformer2DModel.from_single_file(os.path.join(FIXTURES, "official_c2i_tiny.ckpt"))
    f = load_file(os.path.join(FIXTURES, "official_c2i_tiny_outputs.safetensors"))
    with torch.no_grad():
        out = model(f[f"{case}.x"], to_timestep(f[f"{case}.t"]), class_labels=f[f"{case}.y"]).sample
    # Official output is x0 - noise, ours noise - x0.
    assert relative_error(-out, f[f"{case}.out"]) < 1e-5


@pytest.mark.parametrize("case", ["native", "larger", "nonsquare", "smaller"])
def test_t2i_matches_official_at_any_resolution(case):
    model = PixNerdTransformer2DModel.from_single_file(
        os.path.join(FIXTURES, "official_t2i_tiny.ckpt"), sample_size=16
    )
    f = load_file(os.path.join(FIXTURES, "official_t2i_tiny_outputs.safetensors"))
    with torch.no_grad():
        out = model(f[f"{case}.x"], to_timestep(f[f"{case}.t"]), encoder_hidden_states=f[f"{case}.text"]).sample
    assert out.shape == f[f"{case}.x"].shape
    assert relative_error(-out, f[f"{case}.out"]) < 1e-5


@pytest.mark.parametrize(
    "variant, inputs",
    [("c2i", ("square.x", "square.t", "square.y")), ("t2i", ("native.x", "native.t", "native.text"))],
)
def test_online_weights_match_official_with_no_ema(variant, inputs):
    kwargs = {"sample_size": 16} if variant == "t2i" else {}
    model = PixNerdTransformer2DModel.from_single_file(
        os.path.join(FIXTURES, f"official_{variant}_tiny.ckpt"), ema=False, **kwargs
    )
    f = load_file(os.path.join(FIXTURES, f"official_{variant}_tiny_outputs.safetensors"))
    x, t, cond = (f[k] for k in inputs)
    cond_kwarg = {"class_labels": cond} if variant == "c2i" else {"encoder_hidden_states": cond}
    with torch.no_grad():
        out = model(x, to_timestep(t), **cond_kwarg).sample
    assert relative_error(-out, f["online.out"]) < 1e-5
    # The EMA weights give a different output: the flag really picks other tensors.
    assert relative_error(-out, f[inputs[0].split(".")[0] + ".out"]) > 1e-2


# ----------------------------------------------------------------------------------------------------------- behaviour


def test_output_depends_on_timestep_label_and_input(tiny_c2i):
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        base = tiny_c2i(x, 500.0, class_labels=torch.tensor([1, 2])).sample
        other_t = tiny_c2i(x, 100.0, class_labels=torch.tensor([1, 2])).sample
        other_y = tiny_c2i(x, 500.0, class_labels=torch.tensor([10, 2])).sample
    assert (base - other_t).abs().max() > 1e-3
    assert (base[0] - other_y[0]).abs().max() > 1e-3
    torch.testing.assert_close(base[1], other_y[1])  # samples do not mix


def test_scalar_and_batched_timestep_agree(tiny_c2i):
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        a = tiny_c2i(x, 300.0, class_labels=y).sample
        b = tiny_c2i(x, torch.tensor([300.0, 300.0]), class_labels=y).sample
    torch.testing.assert_close(a, b)


def test_outputs_are_deterministic(tiny_t2i):
    x, text = torch.randn(1, 3, 32, 16), torch.randn(1, 6, 24)
    with torch.no_grad():
        a = tiny_t2i(x, 400.0, encoder_hidden_states=text).sample
        b = tiny_t2i(x, 400.0, encoder_hidden_states=text).sample
    assert torch.equal(a, b)


def test_batch_elements_are_independent(tiny_t2i):
    x, text = torch.randn(2, 3, 16, 16), torch.randn(2, 6, 24)
    with torch.no_grad():
        both = tiny_t2i(x, torch.tensor([200.0, 700.0]), encoder_hidden_states=text).sample
        second = tiny_t2i(x[1:], 700.0, encoder_hidden_states=text[1:]).sample
    assert relative_error(both[1:], second) < 1e-5


def test_c2i_runs_at_other_resolutions_natively(tiny_c2i):
    x = torch.randn(1, 3, 24, 8)
    with torch.no_grad():
        out = tiny_c2i(x, 500.0, class_labels=torch.tensor([0])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_return_dict_false_gives_tuple(tiny_c2i):
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([4])
    with torch.no_grad():
        (out,) = tiny_c2i(x, 10.0, class_labels=y, return_dict=False)
        expected = tiny_c2i(x, 10.0, class_labels=y).sample
    assert torch.equal(out, expected)


def test_save_load_round_trip(tiny_t2i, tmp_path):
    tiny_t2i.save_pretrained(tmp_path)
    loaded = PixNerdTransformer2DModel.from_pretrained(tmp_path).eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(tiny_t2i.config)
    original, reloaded = tiny_t2i.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)
    x, text = torch.randn(1, 3, 16, 16), torch.randn(1, 6, 24)
    with torch.no_grad():
        # Same weights; memory alignment of the loaded tensors may change the last bits of BLAS sums.
        out, out_loaded = (
            tiny_t2i(x, 250.0, encoder_hidden_states=text).sample,
            loaded(x, 250.0, encoder_hidden_states=text).sample,
        )
    assert relative_error(out_loaded, out) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_round_trip(tiny_c2i, tmp_path, dtype):
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 10])
    with torch.no_grad():
        reference = tiny_c2i(x, 500.0, class_labels=y).sample
    half = tiny_c2i.to(dtype)
    half.save_pretrained(tmp_path)
    loaded = PixNerdTransformer2DModel.from_pretrained(tmp_path, dtype=dtype).eval()
    assert all(p.dtype == dtype for p in loaded.parameters())
    with torch.no_grad():
        out = loaded(x, 500.0, class_labels=y).sample
    assert out.dtype == dtype
    # Low-precision weights stay close to the float32 result (not equal: bf16 has 8 bits of mantissa).
    assert relative_error(out.float(), reference) < 0.1


def test_gradient_checkpointing_gives_same_gradients(tiny_t2i):
    tiny_t2i.train()
    x, text = torch.randn(2, 3, 16, 16), torch.randn(2, 6, 24)

    def grads():
        tiny_t2i.zero_grad()
        tiny_t2i(x, torch.tensor([100.0, 900.0]), encoder_hidden_states=text).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in tiny_t2i.named_parameters()}

    plain = grads()
    tiny_t2i.enable_gradient_checkpointing()
    checkpointed = grads()
    assert tiny_t2i.is_gradient_checkpointing
    assert all(
        plain[n].abs().sum() > 0 for n in ["text_refiner_blocks.0.ff.proj_in.weight", "neural_field.proj_out.weight"]
    )
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_compiles_without_graph_breaks(variant, tiny_c2i, tiny_t2i):
    model = tiny_c2i if variant == "c2i" else tiny_t2i
    cond = (
        {"class_labels": torch.tensor([1, 10])}
        if variant == "c2i"
        else {"encoder_hidden_states": torch.randn(2, 6, 24)}
    )
    x = torch.randn(2, 3, 16, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(x, torch.tensor([250.0, 750.0]), **cond).sample,
            model(x, torch.tensor([250.0, 750.0]), **cond).sample,
        )


def test_official_init_zeroes_the_output_layer():
    model = PixNerdTransformer2DModel(**TINY_C2I)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 16, 16), 500.0, class_labels=torch.tensor([1])).sample
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(
    "name, millions", [("PixNerd-L/16", 452.1), ("PixNerd-XL/16", 700.6), ("PixNerd-XXL/16-T2I", 1171.5)]
)
def test_presets_build_official_sizes(name, millions):
    with torch.device("meta"):
        model = PixNerdTransformer2DModel.from_preset(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)
    assert model.config.patch_size == 16
    assert set(PIXNERD_PRESETS) == {"PixNerd-L/16", "PixNerd-XL/16", "PixNerd-XXL/16-T2I"}


def test_unknown_preset_is_an_error():
    with pytest.raises(ValueError, match="`name`"):
        PixNerdTransformer2DModel.from_preset("PixNerd-XXXL/16")


def test_lora_adapter_changes_and_restores_output(tiny_c2i):
    from peft import LoraConfig

    x, y = torch.randn(1, 3, 16, 16), torch.tensor([3])
    with torch.no_grad():
        before = tiny_c2i(x, 500.0, class_labels=y).sample
    tiny_c2i.add_adapter(
        LoraConfig(
            r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "param_generator"], init_lora_weights=False
        )
    )
    with torch.no_grad():
        with_lora = tiny_c2i(x, 500.0, class_labels=y).sample
        scaled_off = tiny_c2i(x, 500.0, class_labels=y, attention_kwargs={"scale": 0.0}).sample
    assert (with_lora - before).abs().max() > 1e-3
    torch.testing.assert_close(scaled_off, before)


def test_rope_takes_tables_that_fsdp_cast_to_bf16():
    """FSDP2's bf16 policy casts every floating input of a shard unit, the RoPE tables passed to each block too."""
    from diffusers_pixnerd.models.transformer_pixnerd import apply_rope, rope_angles

    angles = rope_angles(8, 2, 3, 2.0, 1.0)[:, None]
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    x = torch.randn(1, 6, 2, 8, dtype=torch.bfloat16)
    rotated = apply_rope(x, cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, apply_rope(x, cos.float(), sin.float()))
    assert not torch.equal(rotated, x)


# ------------------------------------------------------------------------------------------------------------ any size


def tiny_model(variant: str, **overrides) -> PixNerdTransformer2DModel:
    torch.manual_seed(0)
    config = {**(TINY_C2I if variant == "c2i" else TINY_T2I), **overrides}
    return randomize_(PixNerdTransformer2DModel(**config)).eval()


def condition(variant: str, batch: int) -> dict:
    if variant == "c2i":
        return {"class_labels": torch.arange(1, batch + 1)}
    return {"encoder_hidden_states": torch.randn(batch, 6, 24, generator=torch.Generator().manual_seed(1))}


@pytest.mark.parametrize("variant", ["c2i", "t2i"])
def test_trained_grid_decodes_twice_the_size_in_larger_patches(variant):
    # The tiny models are trained at 16 px in 4 px patches (a 4x4 grid). At 32 px on the trained grid each token decodes
    # an 8x8 patch. An input repeated 2x2 (what the backbone's nearest resize inverts exactly) gives the backbone the
    # same tokens, and the patch corners sit at the same neural-field positions (0 and 1) with the same pixel values,
    # so they must equal the corners at 16 px: the backbone kept its grid and only the neural field sampled more.
    model, cond = tiny_model(variant), condition(variant, 2)
    x16 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x32 = x16.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    with torch.no_grad():
        out16 = model(x16, 400.0, **cond).sample
        out32 = model(x32, 400.0, **cond, trained_grid=True).sample
    assert model.token_grid(32, 32, trained_grid=True) == (4, 4, 8, 8)
    torch.testing.assert_close(out32[..., ::8, ::8], out16[..., ::4, ::4], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out32[..., 7::8, 7::8], out16[..., 3::4, 3::4], rtol=1e-5, atol=1e-5)
    # In between, the field renders new positions: not a copy of the 16 px output.
    assert (out32[..., 1::8, 1::8] - out16[..., ::4, ::4]).abs().max() > 1e-3


def test_c2i_forward_keeps_the_official_native_grid_by_default():
    # The official class-conditional forward runs any size on its own grid (parity fixtures); the trained grid is an
    # opt-in, and at the trained size both are the same computation.
    model, cond = tiny_model("c2i"), condition("c2i", 2)
    assert model.token_grid(32, 32) == (8, 8, 4, 4) and model.token_grid(32, 32, trained_grid=False) == (8, 8, 4, 4)
    x16, x32 = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x16, 300.0, **cond).sample, model(x16, 300.0, **cond, trained_grid=True).sample)
        native, trained = (model(x32, 300.0, **cond, trained_grid=g).sample for g in (None, True))
    assert (native - trained).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------- bad input


def test_config_needs_exactly_one_condition():
    with pytest.raises(ValueError, match="`num_classes`"):
        PixNerdTransformer2DModel(**{**TINY_C2I, "text_embed_dim": 24})
    with pytest.raises(ValueError, match="`num_classes`"):
        PixNerdTransformer2DModel(**{**TINY_C2I, "num_classes": None})


@pytest.mark.parametrize(
    "argument, value",
    [
        ("sample_size", 0),
        ("patch_size", 0),
        ("patch_size", 2.5),
        ("num_layers", -1),
        ("num_attention_heads", 0),
        ("attention_head_dim", "16"),
        ("num_neural_field_layers", 0),
        ("neural_field_hidden_size", 0),
        ("num_classes", 0),
        ("in_channels", 0),
        ("mlp_ratio", float("nan")),
        ("mlp_ratio", 0),
    ],
)
def test_model_config_errors_name_the_argument(argument, value):
    with pytest.raises(ValueError, match=f"`{argument}` must be a positive"):
        PixNerdTransformer2DModel(**{**TINY_C2I, argument: value})


@pytest.mark.parametrize(
    "shape, match",
    [
        ((1, 4, 16, 16), "`hidden_states` must have shape \\(batch, 3"),
        ((1, 3, 18, 16), "multiples of 4"),
        ((3, 16, 16), "`hidden_states`"),
    ],
)
def test_bad_hidden_states_are_rejected(tiny_c2i, shape, match):
    with pytest.raises(ValueError, match=match):
        tiny_c2i(torch.randn(shape), 500.0, class_labels=torch.tensor([1]))


@pytest.mark.parametrize("labels", [[11], [-1], [1, 2, 3]])
def test_bad_class_labels_are_rejected(tiny_c2i, labels):
    with pytest.raises(ValueError, match="`class_labels`"):
        tiny_c2i(torch.randn(2, 3, 16, 16), 500.0, class_labels=torch.tensor(labels))


def test_missing_condition_is_rejected(tiny_c2i, tiny_t2i):
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="`class_labels` is required"):
        tiny_c2i(x, 500.0)
    with pytest.raises(ValueError, match="`encoder_hidden_states` is required"):
        tiny_t2i(x, 500.0)
    with pytest.raises(ValueError, match="`class_labels` was given"):
        tiny_t2i(x, 500.0, class_labels=torch.tensor([1]), encoder_hidden_states=torch.randn(1, 6, 24))


@pytest.mark.parametrize("text_shape", [(1, 6, 20), (1, 5, 24), (2, 6, 24)])
def test_wrong_text_shape_is_rejected(tiny_t2i, text_shape):
    with pytest.raises(ValueError, match=r"`encoder_hidden_states` must have shape \(1, 6, 24\)"):
        tiny_t2i(torch.randn(1, 3, 16, 16), 500.0, encoder_hidden_states=torch.randn(text_shape))


def test_t2i_resolution_must_fit_the_token_grid(tiny_t2i):
    # sample_size 16 and patch 4: a 4x4 token grid at every resolution, so sides must be multiples of 4 (and 20 is).
    with torch.no_grad():
        assert tiny_t2i(torch.randn(1, 3, 20, 12), 1.0, encoder_hidden_states=torch.randn(1, 6, 24)).sample.shape[
            -2:
        ] == (20, 12)
    big = PixNerdTransformer2DModel(**{**TINY_T2I, "sample_size": 32})  # 8x8 grid: sides must be multiples of 8
    with pytest.raises(ValueError, match="multiples of 8"):
        big(torch.randn(1, 3, 20, 16), 1.0, encoder_hidden_states=torch.randn(1, 6, 24))


def test_timestep_batch_mismatch_is_rejected(tiny_c2i):
    with pytest.raises(ValueError, match="`timestep`"):
        tiny_c2i(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 2.0, 3.0]), class_labels=torch.tensor([1, 2]))


# ------------------------------------------------------------------------------------------------------- saved folders


def edit_json(path, **changes):
    with open(path) as f:
        data = json.load(f)
    data.update(changes)
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.mark.parametrize("num_layers", [1, 3])
def test_a_config_whose_num_layers_disagrees_with_the_weights_is_named(tmp_path, num_layers):
    tiny_c2i_pipeline().save_pretrained(tmp_path)  # 2 DiT blocks
    edit_json(tmp_path / "transformer" / "config.json", num_layers=num_layers)
    expected = rf"weights in {re.escape(str(tmp_path / 'transformer'))} do not fit its config.json: `num_layers` is "
    expected += rf"{num_layers} in "
    expected += r"config.json but the weights hold 2 blocks"
    with pytest.raises(ValueError, match=expected):
        PixNerdTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    with pytest.raises(ValueError, match=expected):
        PixNerdPipeline.from_pretrained(tmp_path)


def test_a_config_that_fits_its_weights_still_loads_with_loading_info(tmp_path):
    pipe = tiny_c2i_pipeline()
    pipe.transformer.save_pretrained(tmp_path)
    model, info = PixNerdTransformer2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), pipe.transformer.state_dict().values()))


def tiny_unet():
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=16,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )


def test_a_unet_config_in_a_pixnerd_folder_is_named(tmp_path):
    tiny_c2i_pipeline().save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / "transformer")
    tiny_unet().save_pretrained(tmp_path / "transformer")
    expected = rf"{re.escape(str(tmp_path / 'transformer' / 'config.json'))} is the config of a UNet2DModel, not of"
    with pytest.raises(ValueError, match=expected):
        PixNerdTransformer2DModel.from_pretrained(tmp_path, subfolder="transformer")
    with pytest.raises(ValueError, match=expected):
        PixNerdPipeline.from_pretrained(tmp_path)
    # The folder's model_index.json naming a UNet as the transformer.
    edit_json(tmp_path / "model_index.json", transformer=["diffusers", "UNet2DModel"])
    with pytest.raises(ValueError, match="`transformer` must be a PixNerdTransformer2DModel, got a UNet2DModel"):
        PixNerdPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="`transformer` must be a PixNerdTransformer2DModel, got a UNet2DModel"):
        PixNerdT2IPipeline(transformer=tiny_unet(), scheduler=PixNerdFlowMatchScheduler())
