"""Output preservation (`--output_preservation_word`): each training caption without the concept word must give, on the
same noisy image, what the base model gives (the LoRA adapters switched off). The caption rewrite, switching adapters
off and on, the loss against a hand-computed one, its gradient, whole runs (exact resume, the loss changes the
result) and bad flags. Tiny models, in-process runs."""

import copy

import pytest
import torch
from conftest import TINY_T2I, qwen3_tokenizer, randomize_, tiny_qwen3
from safetensors.torch import load_file
from test_prior_preservation import LORA, LORA_FILE, parse, run_and_resume
from test_train_scripts import T2I_SCRIPT, assets, run_main, t2i_args  # noqa: F401

from diffusers_pixnerd import PixNerdTransformer2DModel
from diffusers_pixnerd.training.lora import adapters_disabled, add_lora_adapters
from diffusers_pixnerd.training.objectives import PixNerdTrainingModule, flow_matching_loss
from diffusers_pixnerd.training.prior import caption_without_word, output_preservation_captions


@pytest.mark.parametrize(
    "caption, word, expected",
    [
        ("a blue coat", "blue", "a coat"),
        ("An inverted coat, photo", "inverted", "A coat, photo"),
        ("here is an inverted pair of pants, centered", "inverted", "here is a pair of pants, centered"),
        ("a photo of an checkered umbrella", "checkered", "a photo of an umbrella"),
        ("two Blue coats.", "blue", "two coats."),
        ("blue", "blue", ""),
        ("a bluebird on a coat", "blue", "a bluebird on a coat"),  # whole words only
        ("a sks dog", "sks", "a dog"),
    ],
)
def test_the_caption_loses_the_word_and_keeps_its_grammar(caption, word, expected):
    assert caption_without_word(caption, word) == expected


def test_the_rows_that_hold_the_word_are_marked():
    preserved, rows = output_preservation_captions(["a blue coat", "a coat", "blue shoes"], "blue")
    assert preserved == ["a coat", "a coat", "shoes"] and rows.tolist() == [True, False, True]
    # --output_preservation_reg: the regularisation rows after them, as they are, all preserved.
    preserved, rows = output_preservation_captions(["a blue coat", "a coat"], "blue", ["a dress", "a shoe"])
    assert preserved == ["a coat", "a coat", "a dress", "a shoe"] and rows.tolist() == [True, False, True, True]


def lora_transformer_and_encoder(seed=0):
    """A tiny T2I transformer and Qwen3, both with LoRA adapters whose B is random (as after training)."""
    torch.manual_seed(seed)
    transformer, encoder = randomize_(PixNerdTransformer2DModel(**TINY_T2I)).eval(), tiny_qwen3()
    base = copy.deepcopy(transformer), copy.deepcopy(encoder)
    add_lora_adapters(transformer, 4, target_modules=["to_q", "to_v", "param_generator"])
    add_lora_adapters(encoder, 2, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    for module in (transformer, encoder):
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.data = torch.randn(parameter.shape, generator=gen) * 0.3
    return transformer, encoder, base


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


def test_the_preservation_loss_is_the_mse_to_the_base_prediction_on_the_rows_with_the_word():
    transformer, encoder, (base_transformer, base_encoder) = lora_transformer_and_encoder()
    tokenizer = qwen3_tokenizer()
    module = PixNerdTrainingModule(
        transformer, text_encoder=encoder, tokenizer=tokenizer, output_preservation_weight=0.5
    )
    gen = torch.Generator().manual_seed(2)
    pixels, noise = torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(3, 3, 16, 16, generator=gen)
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    captions = ["a blue coat", "a coat", "two blue shoes"]
    preserved, rows = output_preservation_captions(captions, "blue")
    kwargs = dict(pixels=pixels, noise=noise, sigmas=sigmas, drop_mask=torch.zeros(3, dtype=torch.bool))
    losses = module(**kwargs, prompts=captions, preservation_rows=rows, preservation_prompts=preserved)
    # By hand: rows 0 and 2, the base (no adapters) with the captions without the word as the target.
    noisy = (1 - sigmas.reshape(-1, 1, 1, 1)) * pixels + sigmas.reshape(-1, 1, 1, 1) * noise
    index = [0, 2]
    with torch.no_grad():
        base_module = PixNerdTrainingModule(base_transformer, text_encoder=base_encoder, tokenizer=tokenizer)
        base_states = base_module.encode([preserved[i] for i in index], "cpu")
        target = base_transformer(noisy[index], 1000 * sigmas[index], encoder_hidden_states=base_states).sample
        states = module.encode([preserved[i] for i in index], "cpu")
        output = transformer(noisy[index], 1000 * sigmas[index], encoder_hidden_states=states).sample
    expected = flow_matching_loss(output, target, sigmas[index])
    torch.testing.assert_close(losses["preservation_loss"], expected, rtol=1e-5, atol=1e-7)
    assert expected > 1e-4
    torch.testing.assert_close(losses["loss"], losses["fm_loss"] + 0.5 * expected, rtol=1e-5, atol=1e-7)
    # Its gradient reaches the adapters of both models and nothing else.
    transformer.zero_grad(), encoder.zero_grad()
    losses["preservation_loss"].backward()
    for model in (transformer, encoder):
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads and all("lora_" in n for n in grads) and any(g.abs().sum() > 0 for g in grads.values())
    # No row with the word: zero; with untrained adapters (B = 0) the model is the base: zero too.
    none = module(**kwargs, prompts=captions, preservation_rows=torch.zeros(3, dtype=torch.bool),
                  preservation_prompts=captions)  # fmt: skip
    assert none["preservation_loss"].item() == 0.0
    for model in (transformer, encoder):
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.zero_()
    fresh = module(**kwargs, prompts=captions, preservation_rows=rows, preservation_prompts=preserved)
    assert fresh["preservation_loss"].item() == 0.0


# ------------------------------------------------------------------------------------------------ whole runs

STEPS = ["--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 2]


@pytest.mark.parametrize("text", [["--precompute_text_embeddings"], ["--train_text_encoder"]])
def test_a_resumed_run_with_output_preservation_ends_bit_identical_and_differs_from_one_without(
    assets, tmp_path, run_main, text
):
    full, resumed, plain = tmp_path / "full", tmp_path / "resumed", tmp_path / "plain"
    flags = [*LORA, *STEPS, *text]
    args = t2i_args(assets, "captions_txt", full, *flags, "--output_preservation_word", "blue")
    a, b = run_and_resume(run_main, args, full, resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = (full / "README.md").read_text()
    assert "| `output_preservation_word` | `blue` |" in card and "| `output_preservation_weight` | `1.0` |" in card
    run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", plain, *flags))
    c = load_file(plain / "checkpoint-4" / LORA_FILE)
    assert not all(torch.equal(a[k], c[k]) for k in a)  # the loss changed the training


def test_output_preservation_on_the_regularisation_rows_changes_the_run(assets, tmp_path, run_main):
    reg = ["--reg_data_dir", assets / "captions_jsonl", "--reg_ratio", 1, "--precompute_text_embeddings"]
    flags = [*LORA, *STEPS, *reg, "--output_preservation_word", "blue"]
    runs = {}
    for name, extra in (("word_rows", []), ("with_reg", ["--output_preservation_reg"])):
        run_main(T2I_SCRIPT, t2i_args(assets, "captions_txt", tmp_path / name, *flags, *extra))
        runs[name] = load_file(tmp_path / name / "checkpoint-4" / LORA_FILE)
    a, b = runs.values()
    assert not all(torch.equal(a[k], b[k]) for k in a)
    assert "| `output_preservation_reg` | `True` |" in (tmp_path / "with_reg" / "README.md").read_text()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--output_preservation_weight", 2], "`--output_preservation_weight` needs `--output_preservation_word`"),
        (["--output_preservation_word", "blue"], "needs `--use_lora`"),
        ([*LORA, "--output_preservation_word", " "], "`--output_preservation_word` must be a word"),
        ([*LORA, "--output_preservation_word", "blue", "--output_preservation_weight", -1], "must be >= 0"),
        ([*LORA, "--output_preservation_reg"], "`--output_preservation_reg` needs `--output_preservation_word`"),
        ([*LORA, "--output_preservation_word", "blue", "--output_preservation_reg"], "acts on regularisation images"),
    ],
)
def test_bad_output_preservation_flags_are_named(assets, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        parse(assets, tmp_path, *flags)


def test_a_word_in_no_caption_is_named_before_training(assets, tmp_path, run_main):
    args = t2i_args(assets, "captions_txt", tmp_path / "out", *LORA, *STEPS, "--output_preservation_word", "purple")
    with pytest.raises(ValueError, match="`--output_preservation_word` 'purple' is in none of the training captions"):
        run_main(T2I_SCRIPT, args)
    assert not (tmp_path / "out" / "checkpoint-2").exists()
