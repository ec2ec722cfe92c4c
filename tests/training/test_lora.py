"""training/lora.py. Checkpoints of LoRA runs (`examples/train_pixnerd_t2i.py --use_lora`): they hold the adapters in
diffusers' LoRA format (loadable with `load_lora_weights`), the REPA projector, the EMA and Accelerate's optimizer / lr
schedule / RNG files, not the frozen base; they resume bit-identically and load in `examples/evaluate.py --checkpoint`;
a damaged safetensors file of a checkpoint is named on resume. `--train_text_encoder` (LoRA on the Qwen3 text encoder
too, its own rank and learning rate) and `--use_dora`: the adapters of both in one diffusers-format file; exact resume;
bad flags. The adapters switched off for output preservation. Tiny models, in-process runs."""

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_pixnerd import PixNerdT2IPipeline
from diffusers_pixnerd.training.ema import load_ema_state
from diffusers_pixnerd.training.lora import adapters_disabled, word_token_ids

from ..helpers import C2I_SCRIPT, ROOT, T2I_SCRIPT, c2i_args, lora_transformer_and_encoder, t2i_args
from ..helpers import sample_two_steps as sample

sys.path.insert(0, os.path.join(ROOT, "examples"))
import evaluate  # noqa: E402
import train_pixnerd_t2i  # noqa: E402

LORA = ["--use_lora", "--lora_rank", 4, "--learning_rate", 1e-2]


LORA_FILE = "pytorch_lora_weights.safetensors"


ACCELERATE_FILES = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl"}


RESUMABLE = [
    "--use_repa",
    "--repa_encoder",
    None,  # the tiny DINOv2 of `assets`
    "--repa_align_layer",
    1,
    "--use_ema",
    "--ema_decay",
    0.5,
    "--gradient_accumulation_steps",
    2,
    "--max_train_steps",
    4,
    "--checkpointing_steps",
    2,
    "--lr_scheduler",
    "cosine",
    "--lr_warmup_steps",
    1,
    "--random_flip",
]


# ---------------------------------------------------------------------------------------------------- LoRA checkpoints


def lora_run(assets, out, run_main, *extra):
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", out, *LORA, *extra))
    return out


def test_what_a_run_writes_gets_the_usual_permissions(assets, tmp_path, run_main):
    out = lora_run(assets, tmp_path / "lora", run_main, "--max_train_steps", 2, "--checkpointing_steps", 2)
    mask = os.umask(0)
    os.umask(mask)
    for root, folders, files in os.walk(out):
        for name in files:  # safetensors writes 0600 files: opened up to what the umask allows, as any new file
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o666 & ~mask, os.path.join(root, name)
        for name in folders:
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o777 & ~mask, os.path.join(root, name)
    pipe = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    pipe.save_pretrained(tmp_path / "saved")
    weights = tmp_path / "saved" / "transformer" / "diffusion_pytorch_model.safetensors"
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~mask


def expected_adapters(pipeline_folder, rank: int) -> dict[str, torch.Size]:
    """The diffusers-format keys and shapes of the adapters the script puts on the base with its default targets."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = PixNerdT2IPipeline.from_pretrained(pipeline_folder).transformer
    targets = train_pixnerd_t2i.lora_target_modules(train_pixnerd_t2i.LORA_TARGET_MODULES)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    return {f"transformer.{k}": v.shape for k, v in get_peft_model_state_dict(transformer).items()}


@pytest.fixture
def base(assets):
    """The tiny base pipeline the LoRA runs train on."""
    return PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")


def optimizer_state(checkpoint):
    return torch.load(checkpoint / "optimizer.bin", weights_only=True)


def test_a_lora_checkpoint_holds_the_adapters_not_the_base(assets, tmp_path, run_main, base):
    out = lora_run(assets, tmp_path / "lora", run_main, "--max_train_steps", 2, "--checkpointing_steps", 2)
    checkpoint = out / "checkpoint-2"
    assert set(os.listdir(checkpoint)) == {LORA_FILE, "training_state.json", *ACCELERATE_FILES}
    adapters = load_file(checkpoint / LORA_FILE)
    assert {k: v.shape for k, v in adapters.items()} == expected_adapters(assets / "t2i_pipeline", rank=4)
    assert all(v.dtype == torch.float32 for v in adapters.values())  # the adapters train in float32
    # The file is the adapters and a small header: no base weight in it.
    adapter_bytes = sum(v.numel() * v.element_size() for v in adapters.values())
    base_bytes = sum(p.numel() * p.element_size() for p in base.transformer.parameters())
    assert 0 < os.path.getsize(checkpoint / LORA_FILE) - adapter_bytes < 16_384
    assert adapter_bytes < base_bytes / 2
    # AdamW's state is per adapter tensor, two moments of its shape.
    state = optimizer_state(checkpoint)["state"]
    assert sorted(tuple(s["exp_avg"].shape) for s in state.values()) == sorted(
        tuple(v.shape) for v in adapters.values()
    )
    assert all(s["exp_avg_sq"].shape == s["exp_avg"].shape for s in state.values())


def test_load_lora_weights_of_the_last_checkpoint_gives_the_exported_images(assets, tmp_path, run_main, base):
    out = lora_run(assets, tmp_path / "lora", run_main, "--max_train_steps", 2, "--checkpointing_steps", 2)
    before = sample(base, "a cat")
    from_checkpoint = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    from_checkpoint.load_lora_weights(out / "checkpoint-2")
    base.load_lora_weights(out)  # the run's export
    exported = sample(base, "a cat")
    assert torch.equal(sample(from_checkpoint, "a cat"), exported)
    assert (exported - before).abs().max() > 1e-3  # the adapters changed the images


def resumable_args(assets, out):
    extra = [assets / "dinov2" if a is None else a for a in RESUMABLE]
    return t2i_args(assets, "captions_txt", out, *LORA, *extra)


def test_a_resumed_lora_run_ends_in_the_same_state(assets, tmp_path, run_main):
    """With REPA, the EMA, gradient accumulation and an epoch boundary: stopped after checkpoint-2 (a copy of it in a
    fresh folder) and resumed, the adapters, projector, EMA, optimizer and lr schedule at step 4 equal those of the
    uninterrupted run."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = resumable_args(assets, full)
    run_main(T2I_SCRIPT, args)
    os.makedirs(resumed)
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    args[args.index("--output_dir") + 1] = resumed
    run_main(T2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    a, b = full / "checkpoint-4", resumed / "checkpoint-4"
    expected_files = {LORA_FILE, "projector.safetensors", "ema.safetensors", "training_state.json", *ACCELERATE_FILES}
    assert set(os.listdir(a)) == set(os.listdir(b)) == expected_files
    for name in (LORA_FILE, "projector.safetensors"):
        tensors_a, tensors_b = load_file(a / name), load_file(b / name)
        assert tensors_a.keys() == tensors_b.keys() and all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    assert all(k.startswith("transformer.") and ".lora_" in k for k in load_file(a / LORA_FILE))
    ema_a, ema_b = load_ema_state(str(a / "ema.safetensors")), load_ema_state(str(b / "ema.safetensors"))
    assert ema_a["optimization_step"] == ema_b["optimization_step"] == 4
    assert len(ema_a["shadow_params"]) == len(load_file(a / LORA_FILE))  # the EMA follows the adapters only
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    opt_a, opt_b = optimizer_state(a), optimizer_state(b)
    assert opt_a["param_groups"] == opt_b["param_groups"] and opt_a["state"].keys() == opt_b["state"].keys()
    for key, state in opt_a["state"].items():
        assert all(torch.equal(state[name], opt_b["state"][key][name]) for name in state)
    sched_a, sched_b = (torch.load(c / "scheduler.bin", weights_only=True) for c in (a, b))
    assert sched_a == sched_b and sched_a["last_epoch"] == 4
    assert json.loads((b / "training_state.json").read_text())["global_step"] == 4
    # The run really moved between the two checkpoints.
    step_2, step_4 = load_file(full / "checkpoint-2" / LORA_FILE), load_file(a / LORA_FILE)
    assert not all(torch.equal(step_2[k], step_4[k]) for k in step_4)


def write_labelled_prompts(path):
    path.write_text("\n".join(json.dumps({"prompt": p, "label": i}) for i, p in enumerate(["a cat", "a red square"])))
    return path


def evaluate_samples(assets, tmp_path, name, *extra) -> np.ndarray:
    prompts = write_labelled_prompts(tmp_path / "prompts.jsonl")
    args = ["--model", assets / "t2i_pipeline", "--prompt_file", prompts, "--num_samples", 2, "--batch_size", 2]
    args += ["--num_inference_steps", 2, "--device", "cpu", "--output_dir", tmp_path / name, *extra]
    evaluate.main(evaluate.parse_args([str(a) for a in args]))
    return np.load(tmp_path / name / "samples.npz")["arr_0"]


def test_evaluate_loads_a_lora_checkpoint_on_the_base_model(assets, tmp_path, run_main):
    """`--checkpoint` of a LoRA run with an EMA: the EMA of the adapters on `--model`, the images of the export."""
    out = tmp_path / "lora"
    run_main(T2I_SCRIPT, resumable_args(assets, out))
    from_checkpoint = evaluate_samples(assets, tmp_path, "checkpoint", "--checkpoint", out / "checkpoint-4")
    exported = evaluate_samples(assets, tmp_path, "export", "--lora", out)
    plain = evaluate_samples(assets, tmp_path, "base")
    assert np.array_equal(from_checkpoint, exported)
    assert not np.array_equal(from_checkpoint, plain)
    metrics = json.loads((tmp_path / "checkpoint" / "metrics.json").read_text())
    assert metrics["lora"] == str(out / "checkpoint-4") and metrics["lora_scale"] == 1.0
    with pytest.raises(ValueError, match="holds LoRA adapters: pass it or `--lora`, not both"):
        evaluate_samples(assets, tmp_path, "both", "--checkpoint", out / "checkpoint-4", "--lora", out)


def test_a_truncated_model_file_names_the_checkpoint_and_an_earlier_one(assets, tmp_path, run_main):
    out = tmp_path / "out"
    args = c2i_args(assets, out, "--max_train_steps", 2, "--checkpointing_steps", 1, "--no_use_repa")
    run_main(C2I_SCRIPT, args)
    model_file = out / "checkpoint-2" / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # a copy cut short
    args[args.index("--max_train_steps") + 1] = 3
    with pytest.raises(
        ValueError,
        match=r"checkpoint-2/model\.safetensors is damaged \(.*\): this checkpoint cannot be resumed\. Resume from an "
        r"earlier checkpoint by name, e\.g\. `--resume_from_checkpoint checkpoint-1`",
    ):
        run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "latest"])
    run_main(C2I_SCRIPT, [*args, "--resume_from_checkpoint", "checkpoint-1"])  # what the message says works
    assert json.loads((out / "checkpoint-3" / "training_state.json").read_text())["global_step"] == 3


def test_a_truncated_lora_file_is_named_and_never_skipped(assets, tmp_path, run_main):
    out = lora_run(assets, tmp_path / "lora", run_main, "--max_train_steps", 1)
    lora_file = out / "checkpoint-1" / LORA_FILE
    lora_file.write_bytes(lora_file.read_bytes()[:-10])
    args = t2i_args(assets, "captions_txt", out, *LORA, "--max_train_steps", 2, "--resume_from_checkpoint", "latest")
    with pytest.raises(
        ValueError, match=rf"checkpoint-1/{LORA_FILE} is damaged .*There is no earlier checkpoint in .*lora"
    ):
        run_main(T2I_SCRIPT, args)


def test_a_checkpoint_of_the_other_kind_is_refused(assets, tmp_path, run_main):
    lora = lora_run(assets, tmp_path / "lora", run_main, "--max_train_steps", 1)
    full = tmp_path / "full"
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", full, "--max_train_steps", 1, "--no_use_repa"))
    resume = ["--max_train_steps", 2, "--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match="holds the adapters of a LoRA run: resume it with `--use_lora`"):
        run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", lora, "--no_use_repa", *resume))
    with pytest.raises(
        ValueError, match="holds no pytorch_lora_weights.safetensors: it was not written by a LoRA run"
    ):
        run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", full, *LORA, *resume))
    with pytest.raises(ValueError, match="holds other transformer adapters than this run trains .*`--lora_rank`"):
        run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", lora, *LORA, "--lora_rank", 8, *resume))


# ------------------------------------------------------------------------------------------ text-encoder LoRA and DoRA


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


def test_token_embedding_adapters_change_only_the_tokens_the_run_saw_and_load(assets, tmp_path, run_main):
    out = run(
        assets, tmp_path / "emb", run_main, *TEXT_LORA, "--text_encoder_lora_target_modules", "embed_tokens",
        "--max_train_steps", 3,
    )  # fmt: skip
    text = {k: v for k, v in load_file(out / LORA_FILE).items() if k.startswith("text_encoder.")}
    assert set(text) == {"text_encoder.embed_tokens.lora_embedding_A", "text_encoder.embed_tokens.lora_embedding_B"}
    pipe = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    captions = [path.read_text() for path in (assets / "captions_txt").glob("*.txt")]
    seen = {i for ids in pipe.tokenizer(captions)["input_ids"] for i in ids}
    changed = set(torch.nonzero(text["text_encoder.embed_tokens.lora_embedding_A"].abs().sum(0)).flatten().tolist())
    assert changed and changed <= seen | {pipe.tokenizer.pad_token_id}  # a token no prompt held keeps its embedding
    before = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0]
    pipe.load_lora_weights(out)
    after = pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0]
    assert (after - before).abs().max() > 1e-4
    pipe.unload_lora_weights()
    torch.testing.assert_close(pipe.encode_prompt("a cat", do_classifier_free_guidance=False)[0], before)


def test_token_words_restrict_the_embedding_adapter_to_their_tokens(assets, tmp_path, run_main, caplog):
    flags = [*TEXT_LORA, "--text_encoder_lora_target_modules", "embed_tokens", "--max_train_steps", 3]
    with caplog.at_level("INFO"):
        out = run(assets, tmp_path / "words", run_main, *flags, "--text_encoder_token_words", "cat,dog")
    a = load_file(out / LORA_FILE)["text_encoder.embed_tokens.lora_embedding_A"]
    pipe = PixNerdT2IPipeline.from_pretrained(assets / "t2i_pipeline")
    words = word_token_ids(pipe.tokenizer, ["cat", "dog"])
    # The log names the tokens that learn, as text (a split word's pieces among them).
    assert f"Token embeddings that learn: {[pipe.tokenizer.decode([i]) for i in words]}" in caplog.text
    assert "' cat'" in caplog.text and "'Dog'" in caplog.text
    assert words == sorted({*pipe.tokenizer(" cat")["input_ids"], *pipe.tokenizer("Dog")["input_ids"], *words})
    changed = torch.nonzero(a.abs().sum(0)).flatten().tolist()
    assert changed and set(changed) <= set(words)  # no other token moved
    # A prompt without those words is encoded exactly as the base encodes it; one with them is not.
    before = [pipe.encode_prompt(p, do_classifier_free_guidance=False)[0] for p in ("a red bird", "a cat")]
    pipe.load_lora_weights(out)
    after = [pipe.encode_prompt(p, do_classifier_free_guidance=False)[0] for p in ("a red bird", "a cat")]
    assert torch.equal(after[0], before[0]) and (after[1] - before[1]).abs().max() > 1e-4


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
            [*LORA, "--train_text_encoder", "--text_encoder_token_words", "cat"],
            r"`--text_encoder_token_words` chooses .* add embed_tokens to `--text_encoder_lora_target_modules`",
        ),
        ([*LORA, "--text_encoder_token_words", "cat"], r"`--text_encoder_token_words` is a setting of"),
        (
            [
                *LORA,
                "--train_text_encoder",
                "--text_encoder_lora_target_modules",
                "embed_tokens",
                "--text_encoder_token_words",
                " , ",
            ],
            r"`--text_encoder_token_words` must name at least one word",
        ),
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


# ------------------------------------------------------------------------- adapters switched off (output preservation)


def test_adapters_are_off_inside_the_block_and_on_again_after():
    transformer, encoder, (base_transformer, base_encoder) = lora_transformer_and_encoder()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    t = torch.tensor([300.0, 800.0])
    states = torch.randn(2, transformer.config.text_max_length, transformer.config.text_embed_dim, generator=gen)
    tokens = torch.randint(0, encoder.config.vocab_size, (2, 5), generator=gen)
    with torch.no_grad():
        lora_out = transformer(x, t, encoder_hidden_states=states).sample
        lora_text = encoder(tokens).last_hidden_state
        with adapters_disabled(transformer, encoder, None):
            torch.testing.assert_close(
                transformer(x, t, encoder_hidden_states=states).sample,
                base_transformer(x, t, encoder_hidden_states=states).sample,
            )
            torch.testing.assert_close(encoder(tokens).last_hidden_state, base_encoder(tokens).last_hidden_state)
        assert (lora_out - base_transformer(x, t, encoder_hidden_states=states).sample).abs().max() > 1e-3
        torch.testing.assert_close(transformer(x, t, encoder_hidden_states=states).sample, lora_out, rtol=0, atol=0)
        torch.testing.assert_close(encoder(tokens).last_hidden_state, lora_text, rtol=0, atol=0)
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # the adapters train again, the base stays frozen
