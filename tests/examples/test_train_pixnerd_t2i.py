"""examples/train_pixnerd_t2i.py end to end: `accelerate launch` in subprocesses (full fine-tuning with text-encoder
layers on 2 processes, LoRA with precomputed embeddings), failures, the export after a short fine-tune. Tiny models,
no network."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdT2IPipeline
from diffusers_pixnerd.training.checkpoints import load_checkpoint_weights
from diffusers_pixnerd.training.ema import load_ema_state

from ..helpers import ROOT, T2I_SCRIPT, launch, save_image, t2i_args
from ..helpers import sample_two_steps as sample

# --------------------------------------------------------------------------------------------------- accelerate launch


def test_t2i_full_fine_tuning_two_processes_with_text_encoder_layers(assets, tmp_path):
    out = tmp_path / "t2i"
    log = launch(
        T2I_SCRIPT,
        t2i_args(
            assets,
            "captions_jsonl",
            out,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
            "--train_text_encoder_layers",
            1,
            "--repa_encoder",
            assets / "dinov2",
            "--repa_align_layer",
            1,
            "--ema_decay",
            0.5,
            "--learning_rate",
            1e-3,
        ),
        tmp_path,
        num_processes=2,
    )
    assert "World size 2: all processes hold identical weights after step 1" in log
    base = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    tuned = PixNerdT2IPipeline.from_pretrained(out)
    assert tuned.text_encoder is not None and tuned.tokenizer is not None

    def up_proj(pipe, layer):
        return pipe.text_encoder.layers[layer].mlp.up_proj.weight

    assert not torch.equal(up_proj(base, -1), up_proj(tuned, -1))  # the trained last layer
    assert torch.equal(up_proj(base, 0), up_proj(tuned, 0))  # a frozen one
    assert not torch.equal(base.transformer.patch_embed.weight, tuned.transformer.patch_embed.weight)
    assert any(k.startswith("projector.") for k in load_file(out / "checkpoint-2" / "model.safetensors"))
    assert torch.isfinite(sample(tuned, "a cat")).all()
    # The last checkpoint, loaded for evaluation, is the export: EMA transformer and the trained encoder.
    evaluated = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    with pytest.raises(ValueError, match="also trained the text encoder.*pass `text_encoder`"):
        load_checkpoint_weights(evaluated.transformer, str(out / "checkpoint-2"))
    checkpoint = str(out / "checkpoint-2")
    loaded = load_checkpoint_weights(evaluated.transformer, checkpoint, text_encoder=evaluated.text_encoder)
    assert loaded == "ema"
    for exported, loaded in ((tuned.transformer, evaluated.transformer), (tuned.text_encoder, evaluated.text_encoder)):
        loaded_state = loaded.state_dict()
        assert all(torch.equal(v, loaded_state[k]) for k, v in exported.state_dict().items())


def test_t2i_lora_with_precomputed_embeddings_loads_into_the_pipeline(assets, tmp_path):
    out = tmp_path / "lora"
    log = launch(
        T2I_SCRIPT,
        t2i_args(
            assets,
            "captions_txt",
            out,
            "--use_lora",
            "--lora_rank",
            4,
            "--precompute_text_embeddings",
            "--learning_rate",
            1e-2,
            "--max_train_steps",
            2,
            "--checkpointing_steps",
            2,
        ),
        tmp_path,
        mixed_precision="bf16",
    )
    assert "Saved the LoRA weights" in log and os.path.exists(out / "pytorch_lora_weights.safetensors")
    assert not os.path.exists(out / "model_index.json")  # LoRA runs export the adapters only
    assert any(f.startswith("prompt_embeds_") for f in os.listdir(out / "cache"))
    pipe = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    before = sample(pipe, "a cat")
    pipe.load_lora_weights(out)
    after = sample(pipe, "a cat")
    assert (after - before).abs().max() > 1e-3
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card
    assert "base_model:" not in card  # the base is a local folder: never written as a Hub `base_model`
    assert "`to_q`, `to_k`, `to_v`, `to_out.0`, `add_k_proj`, `add_v_proj`" in card and "| `lora_rank` | `4` |" in card
    assert "repa_encoder" not in card and "ema_decay" not in card  # settings this run did not use


# ------------------------------------------------------------------------------------------------------------ failures


def test_a_missing_caption_column_is_reported_before_anything_loads(assets, tmp_path, run_main):
    save_image(tmp_path / "data" / "0.png", 16, 16, seed=0)
    (tmp_path / "data" / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "caption": "x"}))
    args = t2i_args(assets, "captions_txt", tmp_path / "out", "--max_train_steps", 1, "--no_use_repa")
    args[args.index("--train_data_dir") + 1] = tmp_path / "data"
    args[args.index("--pretrained_model_name_or_path") + 1] = tmp_path / "no-such-pipeline"  # never reached
    with pytest.raises(ValueError, match=r"`--caption_column` \('text'\)"):
        run_main(T2I_SCRIPT, args)


def test_a_refused_flag_is_one_line_naming_it_and_what_to_use_instead_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out"
    command = [
        sys.executable, T2I_SCRIPT, "--pretrained_model_name_or_path", tmp_path, "--train_data_dir", tmp_path,
        "--output_dir", out, "--aspect_ratio_buckets", "--reg_data_dir", tmp_path,
    ]  # fmt: skip
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "error: `--reg_data_dir`/`--reg_prompts_file` mix square `--resolution` images" in result.stderr
    assert (
        "leave `--aspect_ratio_buckets` out, and `--image_preprocessing pad` keeps non-square images" in result.stderr
    )
    assert "Traceback" not in result.stderr and not out.exists()


# ------------------------------------------------------------------------------------ the export reflects the training


def test_a_short_full_fine_tune_exports_changed_weights_and_samples(assets, tmp_path, run_main, caplog):
    """With the default (run-length) EMA decay, 12 steps of full fine-tuning move the export away from the base; the
    official constant 0.9999 would keep 99.9% of the base (and is warned about)."""
    out = tmp_path / "sft"
    args = t2i_args(assets, "captions_jsonl", out, "--max_train_steps", 12, "--no_use_repa", "--learning_rate", 1e-3)
    with caplog.at_level(logging.INFO):
        run_main(T2I_SCRIPT, args)
    assert "EMA decay 0.166667, chosen from the run length (12 steps)" in caplog.text
    assert load_ema_state(str(out / "checkpoint-12" / "ema.safetensors"))["decay"] == pytest.approx(1 - 10 / 12)
    base = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    tuned = PixNerdT2IPipeline.from_pretrained(out)
    base_weights = torch.cat([p.flatten() for p in base.transformer.parameters()])
    tuned_weights = torch.cat([p.flatten() for p in tuned.transformer.parameters()])
    assert (tuned_weights - base_weights).norm() / base_weights.norm() > 1e-3
    change = (sample(tuned, "a cat") - sample(base, "a cat")).abs().mean()
    assert change > 1e-2, change
    card = (out / "README.md").read_text()
    assert "Exported: the EMA of the weights (constant decay 0.166667" in card
    assert "repa_encoder" not in card  # REPA was off: its settings are not listed

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        args = t2i_args(assets, "captions_jsonl", tmp_path / "slow", "--max_train_steps", 2, "--no_use_repa")
        run_main(T2I_SCRIPT, [*args, "--ema_decay", 0.9999])
    assert "still make up 100% of the exported EMA after 2 steps, so the export stays close to them" in caplog.text
