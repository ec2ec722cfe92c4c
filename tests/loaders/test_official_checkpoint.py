"""Official checkpoints to diffusers weights (loaders/official_checkpoint.py, `from_single_file` of the model and
`PixNerdTransformer2DModel.from_single_file`): the inferred architecture, the key mapping, errors naming the file and the key, bad
files and names, `dtype` in every loading path."""

import os
import re
import shutil
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdPipeline, PixNerdTransformer2DModel
from diffusers_pixnerd.convert import main
from diffusers_pixnerd.loaders import infer_config, load_official_state_dict, select_denoiser

from ..helpers import C2I_CKPT, FIXTURES, T2I_CKPT, official_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------------------- conversion


def test_architecture_is_inferred_from_tensors():
    c2i = infer_config(select_denoiser(official_state_dict()))
    assert {k: c2i[k] for k in ("patch_size", "num_layers", "num_attention_heads", "attention_head_dim")} == {
        "patch_size": 4,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
    }
    assert (c2i["num_neural_field_layers"], c2i["neural_field_hidden_size"], c2i["neural_field_mlp_ratio"]) == (
        2,
        8,
        2,
    )
    assert c2i["num_classes"] == 10 and c2i["sample_size"] == 256
    t2i = infer_config(select_denoiser(official_state_dict(T2I_CKPT)))
    assert (t2i["text_embed_dim"], t2i["text_max_length"], t2i["num_text_refiner_layers"]) == (24, 6, 1)
    assert t2i["num_classes"] is None and t2i["sample_size"] == 512 and t2i["mlp_ratio"] == 4.0


def test_fused_swiglu_is_official_w1_then_w3():
    model = PixNerdTransformer2DModel.from_single_file(C2I_CKPT)
    sd = official_state_dict()
    expected = torch.cat([sd["ema_denoiser.blocks.1.mlp.w1.weight"], sd["ema_denoiser.blocks.1.mlp.w3.weight"]])
    torch.testing.assert_close(model.transformer_blocks[1].ff.proj_in.weight, expected)


def test_from_single_file_local_and_hub(tmp_path):
    local = PixNerdTransformer2DModel.from_single_file(C2I_CKPT)
    with mock.patch("huggingface_hub.hf_hub_download", return_value=C2I_CKPT) as download:
        hub = PixNerdTransformer2DModel.from_single_file("MCG-NJU/PixNerd-XL-P16-C2I/model.ckpt")
        url = PixNerdTransformer2DModel.from_single_file(
            "https://huggingface.co/MCG-NJU/PixNerd-XL-P16-C2I/blob/main/model.ckpt"
        )
    assert download.call_args_list[0].args == ("MCG-NJU/PixNerd-XL-P16-C2I", "model.ckpt")
    assert download.call_args_list[1].args == ("MCG-NJU/PixNerd-XL-P16-C2I", "model.ckpt")
    assert download.call_args_list[1].kwargs["revision"] == "main"
    for model in (hub, url):
        assert all(torch.equal(a, b) for a, b in zip(local.state_dict().values(), model.state_dict().values()))


def test_plain_denoiser_state_dict_is_accepted(tmp_path):
    sd = {k[len("ema_denoiser.") :]: v for k, v in official_state_dict().items() if k.startswith("ema_denoiser.")}
    path = tmp_path / "denoiser.pt"
    torch.save(sd, path)
    model = PixNerdTransformer2DModel.from_single_file(str(path))
    torch.testing.assert_close(model.class_embedder.weight, sd["y_embedder.embedding_table.weight"])


# -------------------------------------------------------------------------------------------------------------- errors


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such local file"):
        PixNerdTransformer2DModel.from_single_file(str(tmp_path / "nope.ckpt"))
    with pytest.raises(FileNotFoundError, match="`checkpoint`"):
        load_official_state_dict(str(tmp_path / "nope.ckpt"))


def test_file_that_is_not_a_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match="weights-only"):
        PixNerdTransformer2DModel.from_single_file(str(path))
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"encoder.layer.weight": torch.zeros(2)}}, other)
    with pytest.raises(ValueError, match="Not a PixNerd checkpoint"):
        PixNerdTransformer2DModel.from_single_file(str(other))


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pixnerd_pickle_ran",))


@pytest.mark.parametrize("force_unsafe_env", [False, True])
def test_pickled_code_never_runs(tmp_path, monkeypatch, force_unsafe_env):
    if force_unsafe_env:  # torch honours an explicit weights_only=True even then
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": official_state_dict(), "payload": _Payload()}, path)
    if os.path.exists("/tmp/pixnerd_pickle_ran"):
        os.remove("/tmp/pixnerd_pickle_ran")
    with pytest.raises(ValueError, match="weights-only"):
        PixNerdTransformer2DModel.from_single_file(str(path))
    assert not os.path.exists("/tmp/pixnerd_pickle_ran")


def test_unknown_key_is_an_error(tmp_path):
    sd = official_state_dict()
    sd["ema_denoiser.blocks.0.attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match="Unknown keys.*blocks.0.attn.extra.weight"):
        PixNerdTransformer2DModel.from_single_file(str(path))


def test_missing_key_is_an_error(tmp_path):
    sd = official_state_dict()
    del sd["ema_denoiser.blocks.1.attn.proj.bias"]
    path = tmp_path / "missing.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match=r"lacks weights for.*transformer_blocks.1.attn.to_out.0.bias"):
        PixNerdTransformer2DModel.from_single_file(str(path))


@pytest.mark.parametrize(
    "checkpoint, key",
    [
        (C2I_CKPT, "y_embedder.embedding_table.weight"),
        (C2I_CKPT, "blocks.0.mlp.w1.weight"),
        (C2I_CKPT, "blocks.2.param_generator1.0.weight"),  # the first neural-field block
        (T2I_CKPT, "y_pos_embedding"),
        (T2I_CKPT, "y_embedder.proj.weight"),
        (T2I_CKPT, "blocks.0.mlp.w12.weight"),
    ],
)
def test_an_official_checkpoint_missing_a_key_names_the_file_and_the_key(tmp_path, checkpoint, key):
    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    del state_dict[f"ema_denoiser.{key}"]
    path = str(tmp_path / "edited.ckpt")
    torch.save({"state_dict": state_dict}, path)
    expected = rf"`checkpoint` '{re.escape(path)}' \(EMA weights\): The checkpoint lacks `{key}`, which every official"
    with pytest.raises(ValueError, match=expected):
        PixNerdTransformer2DModel.from_single_file(path, sample_size=16)


def test_an_official_checkpoint_missing_a_bias_names_the_file(tmp_path):
    state_dict = torch.load(C2I_CKPT, map_location="cpu", weights_only=True)["state_dict"]
    del state_dict["ema_denoiser.t_embedder.mlp.0.bias"]
    path = str(tmp_path / "edited.ckpt")
    torch.save({"state_dict": state_dict}, path)
    expected = rf"`checkpoint` '{re.escape(path)}' lacks weights for 1 parameters .*time_embedder"
    with pytest.raises(ValueError, match=expected):
        PixNerdPipeline.from_single_file(path, sample_size=16)


def test_missing_ema_weights_is_an_error(tmp_path):
    sd = {k: v for k, v in official_state_dict().items() if not k.startswith("ema_denoiser.")}
    path = tmp_path / "online_only.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(ValueError, match="no `ema_denoiser.\\*` weights"):
        PixNerdTransformer2DModel.from_single_file(str(path))
    assert PixNerdTransformer2DModel.from_single_file(str(path), ema=False).config.num_classes == 10


# ------------------------------------------------------------------------------------------------- bad files and names


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_an_empty_file_is_named(tmp_path, suffix):
    path = tmp_path / f"empty{suffix}"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=f"`checkpoint` '.*empty{suffix}' is empty"):
        PixNerdTransformer2DModel.from_single_file(str(path))


@pytest.mark.parametrize("content", [b"not a safetensors file at all", None])
def test_a_broken_safetensors_file_is_named(tmp_path, content):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    if content is None:  # a real file cut short
        save_file({"w": torch.zeros(64, 64)}, str(path))
        content = path.read_bytes()[:-100]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="`checkpoint` '.*model.safetensors' could not be read as a safetensors"):
        PixNerdTransformer2DModel.from_single_file(str(path))


@pytest.mark.parametrize("name", ["./missing.ckpt", "/no/such/dir/model.ckpt", "~/missing.ckpt"])
def test_a_missing_local_file_is_not_looked_up_on_the_hub(name, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("asked the Hub"))
    with pytest.raises(FileNotFoundError, match="no such local file"):
        PixNerdTransformer2DModel.from_single_file(name)


def test_a_relative_path_in_an_existing_folder_is_local(monkeypatch):
    monkeypatch.chdir(
        os.path.dirname(FIXTURES)
    )  # "fixtures/missing.ckpt" could also be a Hub repo "fixtures/missing.ckpt"
    with pytest.raises(FileNotFoundError, match="'fixtures/missing.ckpt': no such local file"):
        PixNerdTransformer2DModel.from_single_file("fixtures/missing.ckpt")


@pytest.mark.parametrize("size", [0, -256])
def test_sample_size_must_be_positive(size):
    with pytest.raises(ValueError, match="`sample_size` must be a positive integer"):
        PixNerdTransformer2DModel.from_single_file(C2I_CKPT, sample_size=size)


def test_the_resolution_comes_from_the_file_name_when_it_states_one(tmp_path, caplog):
    import logging
    import shutil

    named = tmp_path / "res512_ft200k_tiny.ckpt"
    shutil.copyfile(C2I_CKPT, named)
    assert PixNerdTransformer2DModel.from_single_file(str(named)).config.sample_size == 512
    with caplog.at_level(logging.INFO):
        model = PixNerdTransformer2DModel.from_single_file(C2I_CKPT)
    assert model.config.sample_size == 256 and "assuming sample_size 256" in caplog.text


def test_unknown_keyword_arguments_are_an_error_not_dropped():
    with pytest.raises(TypeError, match=r"\['sample_sise'\].*sample_size"):
        PixNerdTransformer2DModel.from_single_file(C2I_CKPT, sample_sise=512)
    with pytest.raises(TypeError, match=r"\['text_encoder'\]"):  # a T2I-only option on the C2I pipeline
        PixNerdPipeline.from_single_file(C2I_CKPT, text_encoder=None)


def test_converting_a_directory_says_so_and_what_to_pass(tmp_path):
    (tmp_path / "official").mkdir()
    shutil.copy(C2I_CKPT, tmp_path / "official" / "model.ckpt")
    with pytest.raises(
        IsADirectoryError,
        match=r"'.*official' is a directory \(it holds model.ckpt\): pass the official "
        r"checkpoint file inside it",
    ):
        PixNerdTransformer2DModel.from_single_file(str(tmp_path / "official"))


# --------------------------------------------------------------------------------------------------------------- dtype


def test_dtype_in_every_loading_path(tmp_path):
    """`dtype=` is honoured by the model's and the pipelines' `from_single_file`, the conversion functions, the
    official-folder cache of `from_pretrained` and the converter CLI (it was silently dropped before)."""
    import shutil

    from diffusers_pixnerd import PixNerdT2IPipeline, convert_official_pipeline

    bf16 = torch.bfloat16
    assert PixNerdTransformer2DModel.from_single_file(C2I_CKPT, dtype=bf16).dtype == bf16
    assert PixNerdTransformer2DModel.from_single_file(C2I_CKPT, sample_size=16, dtype=torch.float16).dtype == (
        torch.float16
    )
    assert PixNerdTransformer2DModel.from_single_file(C2I_CKPT, dtype=bf16).dtype == bf16
    assert PixNerdPipeline.from_single_file(C2I_CKPT, sample_size=16, dtype=bf16).transformer.dtype == bf16
    t2i = PixNerdT2IPipeline.from_single_file(T2I_CKPT, sample_size=16, dtype=bf16, text_encoder=None, tokenizer=None)
    assert t2i.transformer.dtype == bf16
    assert convert_official_pipeline(C2I_CKPT, sample_size=16, dtype=bf16).transformer.dtype == bf16

    folder = tmp_path / "PixNerd-tiny"
    folder.mkdir()
    shutil.copy(C2I_CKPT, folder / "model.ckpt")
    cached = PixNerdPipeline.from_pretrained(folder, cache_dir=tmp_path / "cache", sample_size=16, dtype=bf16)
    assert cached.transformer.dtype == bf16

    main(["--checkpoint", C2I_CKPT, "--output", str(tmp_path / "cli"), "--dtype", "bfloat16"])
    assert {v.dtype for v in load_file(tmp_path / "cli" / "diffusion_pytorch_model.safetensors").values()} == {bf16}


def test_torch_dtype_is_not_an_argument_of_ours():
    """Our `from_single_file` methods take `dtype` only (diffusers' deprecated `torch_dtype` was never released here):
    the error names the argument and says what is expected."""
    with pytest.raises(TypeError, match=r"Unexpected keyword argument\(s\) \['torch_dtype'\].*`dtype`"):
        PixNerdTransformer2DModel.from_single_file(C2I_CKPT, torch_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"Unexpected keyword argument\(s\) \['torch_dtype'\].*`dtype`"):
        PixNerdPipeline.from_single_file(C2I_CKPT, sample_size=16, torch_dtype=torch.float16)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dtype=torch.int8), ValueError, r"`dtype` must be a floating-point torch.dtype"),
        (dict(dtype="bfloat16"), ValueError, r"`dtype` must be a floating-point torch.dtype"),
        (dict(dtpye=torch.bfloat16), TypeError, r"Unexpected keyword argument\(s\) \['dtpye'\]"),
    ],
)
def test_bad_dtype_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        PixNerdTransformer2DModel.from_single_file(C2I_CKPT, **kwargs)
