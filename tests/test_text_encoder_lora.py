"""`examples/train_pixnerd_t2i.py --use_lora --train_text_encoder` (LoRA on the Qwen3 text encoder too, its own rank
and learning rate) and `--use_dora`: the adapters of both in one diffusers-format file, loaded back by
`load_lora_weights` into the pipeline's transformer and text encoder; exact resume; bad flags. Tiny models, in-process
runs."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_lora_checkpoints import LORA, LORA_FILE, optimizer_state
from test_train_scripts import T2I_SCRIPT, assets, run_main, t2i_args  # noqa: F401

from diffusers_pixnerd import PixNerdT2IPipeline

TEXT_LORA = [*LORA, "--train_text_encoder", "--text_encoder_lora_rank", 2, "--text_encoder_lr", 5e-3]


def run(assets, out, run_main, *extra):
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", out, *extra))
    return out


def test_text_encoder_adapters_are_trained_exported_with_the_transformers_and_loaded(assets, tmp_path, run_main):
    out = run(assets, tmp_path / "out", run_main, *TEXT_LORA, "--max_train_steps", 3)
    weights = load_file(out / LORA_FILE)
    text = {k: v for k, v in weights.items() if k.startswith("text_encoder.")}
    assert text and any(k.startswith("transformer.") for k in weights)
    assert all(".lora_A." in k or ".lora_B." in k for k in text)
    assert {tuple(v.shape)[0] for k, v in text.items() if ".lora_A." in k} == {2}  # --text_encoder_lora_rank
    assert {k.split(".")[-3] for k in text} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert any(v.abs().sum() > 0 for k, v in text.items() if ".lora_B." in k)  # trained (B starts at zero)
    pipe = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    before = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0]
    pipe.load_lora_weights(out)
    after = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0]
    assert "default_0" in pipe.text_encoder.peft_config and "default_0" in pipe.transformer.peft_config
    assert (after - before).abs().max() > 1e-4  # the prompts now go through the trained encoder adapters
    pipe.fuse_lora()  # into the encoder's weights too
    assert pipe.text_encoder.layers[0].self_attn.q_proj.merged_adapters == ["default_0"]
    torch.testing.assert_close(
        pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0], after, atol=1e-5, rtol=0
    )
    pipe.unfuse_lora()
    pipe.set_adapters("default_0", 0.0)  # both components follow the adapter weight
    torch.testing.assert_close(pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0], before)
    card = (out / "README.md").read_text()
    assert "train_text_encoder" in card and "text_encoder_lora_rank" in card
    # A second adapter beside it (both parts), weighted together; unloading gives the base encoder back.
    pipe.load_lora_weights(out, adapter_name="second")
    assert set(pipe.text_encoder.peft_config) == {"default_0", "second"}
    pipe.set_adapters(["default_0", "second"], [1.0, 1.0])
    both = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0]
    assert (both - after).abs().max() > 1e-5
    pipe.unload_lora_weights()
    torch.testing.assert_close(pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0], before)


def test_a_resumed_text_encoder_lora_run_ends_in_the_same_state(assets, tmp_path, run_main):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = t2i_args(assets, "captions_txt", full, *TEXT_LORA, "--max_train_steps", 4, "--checkpointing_steps", 2)
    run_main(T2I_SCRIPT, args)
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args[args.index("--output_dir") + 1] = resumed
    run_main(T2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    a, b = load_file(full / "checkpoint-4" / LORA_FILE), load_file(resumed / "checkpoint-4" / LORA_FILE)
    assert any(k.startswith("text_encoder.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    opt = optimizer_state(full / "checkpoint-4")
    assert [g["lr"] for g in opt["param_groups"]][1] != opt["param_groups"][0]["lr"]  # its own learning rate
    # A checkpoint with text-encoder adapters, resumed without --train_text_encoder: an error naming the flag.
    other = tmp_path / "other"
    os.makedirs(other)
    shutil.copytree(full / "checkpoint-2", other / "checkpoint-2")
    plain = t2i_args(
        assets, "captions_txt", other, *LORA, "--max_train_steps", 4, "--resume_from_checkpoint", "latest"
    )
    with pytest.raises(ValueError, match=r"holds text-encoder adapters: resume with the `--train_text_encoder`"):
        run_main(T2I_SCRIPT, plain)


def test_dora_adapters_train_and_load(assets, tmp_path, run_main):
    out = run(assets, tmp_path / "dora", run_main, *LORA, "--use_dora", "--max_train_steps", 2)
    weights = load_file(out / LORA_FILE)
    assert any("lora_magnitude_vector" in k for k in weights)
    pipe = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    pipe.load_lora_weights(out)
    assert pipe.transformer.peft_config["default_0"].use_dora


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--train_text_encoder"],
            r"`--train_text_encoder` trains LoRA adapters on the text encoder: pass `--use_lora`",
        ),
        ([*LORA, "--train_text_encoder", "--precompute_text_embeddings"], r"not with `--precompute_text_embeddings`"),
        ([*LORA, "--text_encoder_lr", 1e-4], r"`--text_encoder_lr` is a setting of `--train_text_encoder`"),
        (["--use_dora"], r"`--use_dora` trains DoRA adapters: pass `--use_lora` too"),
    ],
)
def test_bad_text_encoder_lora_flags_are_named(assets, tmp_path, flags, message):
    import train_pixnerd_t2i

    with pytest.raises(ValueError, match=message):
        train_pixnerd_t2i.parse_args([str(a) for a in t2i_args(assets, "captions_txt", tmp_path, *flags)])
