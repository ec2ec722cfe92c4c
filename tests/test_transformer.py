import os

import pytest
import torch
from conftest import FIXTURES, TINY_C2I, TINY_T2I
from safetensors.torch import load_file

from diffusers_pixnerd import PIXNERD_PRESETS, PixNerdTransformer2DModel, convert_official_checkpoint


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def to_timestep(t: torch.Tensor) -> torch.Tensor:
    """Official t (0 = noise) -> diffusers timestep sigma * 1000 (exact for the fixture's t values)."""
    return (1 - t) * 1000


# --- Parity with the official implementation (fixtures from scripts/generate_transformer_fixtures.py) ---


@pytest.mark.parametrize("case", ["square", "nonsquare"])
def test_c2i_matches_official(case):
    model = convert_official_checkpoint(os.path.join(FIXTURES, "official_c2i_tiny.ckpt"))
    f = load_file(os.path.join(FIXTURES, "official_c2i_tiny_outputs.safetensors"))
    with torch.no_grad():
        out = model(f[f"{case}.x"], to_timestep(f[f"{case}.t"]), class_labels=f[f"{case}.y"]).sample
    # Official output is x0 - noise, ours noise - x0.
    assert relative_error(-out, f[f"{case}.out"]) < 1e-5


@pytest.mark.parametrize("case", ["native", "larger", "nonsquare", "smaller"])
def test_t2i_matches_official_at_any_resolution(case):
    model = convert_official_checkpoint(os.path.join(FIXTURES, "official_t2i_tiny.ckpt"), sample_size=16)
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
    model = convert_official_checkpoint(os.path.join(FIXTURES, f"official_{variant}_tiny.ckpt"), ema=False, **kwargs)
    f = load_file(os.path.join(FIXTURES, f"official_{variant}_tiny_outputs.safetensors"))
    x, t, cond = (f[k] for k in inputs)
    cond_kwarg = {"class_labels": cond} if variant == "c2i" else {"encoder_hidden_states": cond}
    with torch.no_grad():
        out = model(x, to_timestep(t), **cond_kwarg).sample
    assert relative_error(-out, f["online.out"]) < 1e-5
    # The EMA weights give a different output: the flag really picks other tensors.
    assert relative_error(-out, f[inputs[0].split(".")[0] + ".out"]) > 1e-2


# --- Behaviour ---


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


# --- Bad input ---


def test_config_needs_exactly_one_condition():
    with pytest.raises(ValueError, match="`num_classes`"):
        PixNerdTransformer2DModel(**{**TINY_C2I, "text_embed_dim": 24})
    with pytest.raises(ValueError, match="`num_classes`"):
        PixNerdTransformer2DModel(**{**TINY_C2I, "num_classes": None})


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
