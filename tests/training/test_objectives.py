"""training/objectives.py: timestep sampling and the flow-matching loss (with loss masks, regularisation rows and
output preservation), the training module (condition dropout, REPA, the prompt encoding)."""

import pytest
import torch

from diffusers_pixnerd import PixNerdTransformer2DModel
from diffusers_pixnerd.testing_utils import TINY_C2I, TINY_T2I, qwen3_tokenizer, randomize_, tiny_qwen3
from diffusers_pixnerd.training import (
    PixNerdTrainingModule,
    REPAProjector,
    capture_block_output,
    condition_drop_mask,
    encode_prompts,
    flow_matching_loss,
    random_flip,
    repa_target_features,
    sample_sigmas,
    shift_sigmas,
)
from diffusers_pixnerd.training.objectives import prior_preservation_losses
from diffusers_pixnerd.training.prior import output_preservation_captions

from ..helpers import lora_transformer_and_encoder, tiny_c2i, tiny_dinov2

pytestmark = pytest.mark.usefixtures("single_thread")


# -------------------------------------------------------------------------------------------------- timesteps and loss


def test_shift_matches_official_time_shift():
    t = torch.linspace(0.01, 0.99, 17)
    for shift in (1.0, 2.0, 4.0):
        official = t / (t + (1 - t) * shift)  # training_repa.py `time_shift_fn`, in t = 1 - sigma
        assert torch.allclose(shift_sigmas(1 - t, shift), 1 - official, atol=1e-6)


def test_logit_normal_sigmas_are_sigmoid_of_normal_then_shifted():
    sigmas = sample_sigmas(64, "logit_normal", shift=2.0, generator=torch.Generator().manual_seed(3))
    expected = torch.sigmoid(torch.normal(0.0, 1.0, (64,), generator=torch.Generator().manual_seed(3)))
    assert torch.allclose(sigmas, 2 * expected / (1 + expected), atol=1e-6)


def test_uniform_sampling_covers_the_unit_interval_and_shift_adds_noise():
    uniform = sample_sigmas(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert 0 <= uniform.min() and uniform.max() <= 1 and abs(uniform.mean().item() - 0.5) < 0.01
    shifted = sample_sigmas(20000, "uniform", shift=4.0, generator=torch.Generator().manual_seed(0))
    assert shifted.mean() > uniform.mean() + 0.1


def test_unknown_timestep_sampling_is_rejected():
    with pytest.raises(ValueError, match="sampling"):
        sample_sigmas(4, "cosine")


def test_flow_matching_loss_is_mse_and_weighting_changes_it():
    pred, target = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    sigmas = torch.tensor([0.2, 0.5, 0.9])
    assert torch.allclose(flow_matching_loss(pred, target, sigmas), ((pred - target) ** 2).mean())
    weighted = flow_matching_loss(pred, target, sigmas, "sigma_sqrt")
    expected = ((pred - target) ** 2 * sigmas.reshape(-1, 1, 1, 1) ** -2).mean()
    assert torch.allclose(weighted, expected)


def test_condition_dropout_rate():
    mask = condition_drop_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and abs(mask.float().mean().item() - 0.1) < 0.01


def test_random_flip_flips_some_images_exactly():
    pixels = torch.randn(16, 3, 4, 4)
    flipped = random_flip(pixels, torch.Generator().manual_seed(0))
    same = [(flipped[i] == pixels[i]).all().item() for i in range(16)]
    mirrored = [(flipped[i] == pixels[i].flip(-1)).all().item() for i in range(16)]
    assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 16


# ---------------------------------------------------------------------------------------------------------- loss masks


def test_the_masked_loss_is_each_images_mask_weighted_mean():
    gen = torch.Generator().manual_seed(0)
    output, target = torch.randn(3, 3, 4, 4, generator=gen), torch.randn(3, 3, 4, 4, generator=gen)
    sigmas = torch.rand(3, generator=gen)
    ones = torch.ones(3, 1, 4, 4)
    torch.testing.assert_close(
        flow_matching_loss(output, target, sigmas, loss_mask=ones), flow_matching_loss(output, target, sigmas)
    )
    mask = torch.zeros(3, 1, 4, 4)
    mask[0, :, :, :2] = 1  # image 0 learns its left half, image 1 everything, image 2 nothing
    mask[1] = 1
    error = (output - target) ** 2
    expected = (error[0, :, :, :2].mean() + error[1].mean() + 0.0) / 3
    torch.testing.assert_close(flow_matching_loss(output, target, sigmas, loss_mask=mask), expected)
    # Soft masks weight; the regularisation rows after the batch learn whole.
    half = torch.full((3, 1, 4, 4), 0.5)
    torch.testing.assert_close(flow_matching_loss(output, target, sigmas, loss_mask=half), error.mean())
    losses = prior_preservation_losses(output, target, sigmas, reg_samples=1, loss_mask=mask[:2])
    torch.testing.assert_close(losses["fm_loss"], (error[0, :, :, :2].mean() + error[1].mean()) / 2)
    torch.testing.assert_close(losses["reg_loss"], error[2].mean())


def test_flips_move_the_mask_with_the_image():
    from diffusers_pixnerd.training.loop import TrainingRun
    from diffusers_pixnerd.training.objectives import StepSampling

    run = TrainingRun.__new__(TrainingRun)  # only `step_inputs` and its generator, without a model
    run.sampling = StepSampling("uniform", 1.0, 0.0, 1.0, 1.29, 0.0, random_flip=True)
    run.generator = lambda: torch.Generator().manual_seed(3)
    pixels = torch.zeros(8, 3, 4, 4)
    pixels[..., :2] = 1  # the left half of each image bright, and its mask on the same half
    mask = torch.zeros(8, 1, 4, 4)
    mask[..., :2] = 1
    inputs = run.step_inputs(pixels, loss_mask=mask)
    flipped = inputs["pixels"][:, 0, 0, -1] == 1
    assert 0 < flipped.sum() < 8  # some flipped, some not
    assert torch.equal(inputs["loss_mask"][:, 0], inputs["pixels"][:, 0])


# ----------------------------------------------------------------------- regularisation images and output preservation


def test_the_reg_rows_get_their_own_mean_and_weight():
    torch.manual_seed(0)
    output, target, sigmas = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.rand(5)
    losses = prior_preservation_losses(output, target, sigmas, "none", reg_samples=2, reg_loss_weight=0.25)
    fm = ((output[:3] - target[:3]) ** 2).mean()
    reg = ((output[3:] - target[3:]) ** 2).mean()
    torch.testing.assert_close(losses["fm_loss"], fm)
    torch.testing.assert_close(losses["reg_loss"], reg)
    torch.testing.assert_close(losses["loss"], fm + 0.25 * reg)
    assert not torch.allclose(losses["loss"], ((output - target) ** 2).mean())  # not the plain mean of all rows


def test_without_reg_rows_the_loss_is_the_plain_flow_matching_loss():
    torch.manual_seed(0)
    output, target, sigmas = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4), torch.rand(4)
    losses = prior_preservation_losses(output, target, sigmas, "cosmap")
    assert set(losses) == {"loss", "fm_loss"}
    torch.testing.assert_close(losses["loss"], flow_matching_loss(output, target, sigmas, "cosmap"))


def test_the_text_preservation_loss_is_the_relative_error_to_the_base_encoder_and_trains_its_adapters_only():
    transformer, encoder, (_, base_encoder) = lora_transformer_and_encoder()
    tokenizer = qwen3_tokenizer()
    module = PixNerdTrainingModule(transformer, text_encoder=encoder, tokenizer=tokenizer, text_preservation_weight=3)
    gen = torch.Generator().manual_seed(2)
    pixels, noise = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(2, 3, 16, 16, generator=gen)
    kwargs = dict(pixels=pixels, noise=noise, sigmas=torch.tensor([0.3, 0.7]), drop_mask=torch.zeros(2, dtype=bool))
    prompts = ["lamp orbit a coat", "quartz two shoes"]
    losses = module(**kwargs, prompts=["a blue coat", "blue shoes"], text_preservation_prompts=prompts)
    with torch.no_grad():
        base = PixNerdTrainingModule(transformer, text_encoder=base_encoder, tokenizer=tokenizer).encode(
            prompts, "cpu"
        )
        adapted = module.encode(prompts, "cpu")
    expected = (adapted - base).pow(2).sum() / base.pow(2).sum()
    assert expected > 1e-6
    torch.testing.assert_close(losses["text_preservation_loss"], expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(losses["loss"], losses["fm_loss"] + 3 * expected, rtol=1e-5, atol=1e-9)
    transformer.zero_grad(), encoder.zero_grad()
    losses["text_preservation_loss"].backward()
    assert all(p.grad is None for p in transformer.parameters())
    grads = {n: p.grad for n, p in encoder.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any(g.abs().sum() > 0 for g in grads.values())


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


# -------------------------------------------------------------------------------------------------------------- module


def batch(size=2, resolution=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "pixels": torch.rand(size, 3, resolution, resolution, generator=gen) * 2 - 1,
        "noise": torch.randn(size, 3, resolution, resolution, generator=gen),
        "sigmas": torch.rand(size, generator=gen),
        "drop_mask": torch.zeros(size, dtype=torch.bool),
    }


def test_loss_is_the_rectified_flow_mse_on_noise_minus_x0():
    transformer = randomize_(tiny_c2i())
    inputs, labels = batch(), torch.tensor([1, 2])
    losses = PixNerdTrainingModule(transformer)(**inputs, class_labels=labels)
    s = inputs["sigmas"].reshape(-1, 1, 1, 1)
    x_t = (1 - s) * inputs["pixels"] + s * inputs["noise"]
    pred = transformer(x_t, inputs["sigmas"] * 1000, class_labels=labels).sample
    expected = ((pred - (inputs["noise"] - inputs["pixels"])) ** 2).mean()
    assert torch.allclose(losses["loss"], expected, rtol=1e-5) and set(losses) == {"loss", "fm_loss"}


def test_dropped_samples_get_the_null_class():
    transformer = tiny_c2i()
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    inputs = batch()
    inputs["drop_mask"] = torch.tensor([True, False])
    PixNerdTrainingModule(transformer)(**inputs, class_labels=torch.tensor([3, 4]))
    assert seen[0].tolist() == [TINY_C2I["num_classes"], 4]


def test_dropped_samples_get_the_empty_prompt_embedding():
    torch.manual_seed(0)
    transformer = PixNerdTransformer2DModel(**TINY_T2I)
    null = torch.randn(1, TINY_T2I["text_max_length"], TINY_T2I["text_embed_dim"])
    cond = torch.randn(2, TINY_T2I["text_max_length"], TINY_T2I["text_embed_dim"])
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"]), with_kwargs=True)
    inputs = batch()
    inputs["drop_mask"] = torch.tensor([False, True])
    PixNerdTrainingModule(transformer, null_encoder_hidden_states=null)(**inputs, encoder_hidden_states=cond)
    assert torch.equal(seen[0][0], cond[0]) and torch.equal(seen[0][1], null[0])


def test_capture_block_output_is_one_based():
    transformer = randomize_(tiny_c2i())
    outputs = []
    transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: outputs.append(out))
    inputs = batch()
    with capture_block_output(transformer, 1) as captured:
        transformer(inputs["pixels"], inputs["sigmas"] * 1000, class_labels=torch.tensor([0, 1]))
    assert len(captured) == 1 and torch.equal(captured[0], outputs[0])
    assert len(transformer.transformer_blocks[0]._forward_hooks) == 1  # its own hook is gone, the test's remains


def test_repa_projector_is_the_official_mlp():
    projector = REPAProjector(32, 768)
    kinds = [type(m).__name__ for m in projector]
    assert kinds == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert [(m.in_features, m.out_features) for m in list(projector)[::2]] == [(32, 32), (32, 32), (32, 768)]


def test_repa_features_match_the_token_grid_without_cls():
    encoder = tiny_dinov2()
    sizes = []
    encoder.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["pixel_values"].shape[-2:]), with_kwargs=True)
    pixels = torch.rand(2, 3, 16, 32) * 2 - 1
    features = repa_target_features(encoder, pixels, token_grid=(4, 8))  # 16 x 32 px in 4 px patches
    assert tuple(sizes[0]) == (14 * 4, 14 * 8)  # 14 * H / patch: the DINOv2 grid is the 4 x 8 token grid
    assert features.shape == (2, 32, 32)
    # ImageNet normalisation of [0, 1] images, bicubic resize, CLS dropped.
    x = ((pixels + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).reshape(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(x, (56, 112), mode="bicubic")
    assert torch.allclose(features, encoder(pixel_values=x).last_hidden_state[:, 1:], atol=1e-5)


def test_repa_loss_adds_half_one_minus_cosine_of_the_projected_block_output():
    transformer, encoder = randomize_(tiny_c2i()), tiny_dinov2()
    torch.manual_seed(1)
    projector = REPAProjector(32, 32)
    inputs, labels = batch(), torch.tensor([0, 1])
    features = repa_target_features(encoder, inputs["pixels"], (4, 4))
    module = PixNerdTrainingModule(transformer, projector, align_layer=2)
    losses = module(**inputs, class_labels=labels, repa_features=features)
    with capture_block_output(transformer, 2) as hidden:
        s = inputs["sigmas"].reshape(-1, 1, 1, 1)
        transformer((1 - s) * inputs["pixels"] + s * inputs["noise"], inputs["sigmas"] * 1000, class_labels=labels)
    cos = torch.nn.functional.cosine_similarity(projector(hidden[0]), features, dim=-1)
    assert torch.allclose(losses["repa_loss"], (1 - cos).mean(), atol=1e-6)
    assert torch.allclose(losses["loss"], losses["fm_loss"] + 0.5 * losses["repa_loss"])


def test_repa_gradients_are_the_same_with_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        transformer, encoder = randomize_(tiny_c2i()), tiny_dinov2()
        torch.manual_seed(1)
        module = PixNerdTrainingModule(transformer, REPAProjector(32, 32), align_layer=1)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        inputs = batch()
        losses = module(
            **inputs,
            class_labels=torch.tensor([0, 1]),
            repa_features=repa_target_features(encoder, inputs["pixels"], (4, 4)),
        )
        losses["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_loss_goes_down_when_overfitting_a_fixed_batch():
    transformer, encoder = tiny_c2i(), tiny_dinov2()
    torch.manual_seed(1)
    module = PixNerdTrainingModule(transformer, REPAProjector(32, 32), align_layer=1)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    fixed = batch(seed=5)
    labels = torch.tensor([1, 2])
    features = repa_target_features(encoder, fixed["pixels"], (4, 4))

    def evaluate():  # at fixed noise and sigmas
        with torch.no_grad():
            losses = module(**fixed, class_labels=labels, repa_features=features)
        return torch.stack([losses["loss"], losses["fm_loss"], losses["repa_loss"]])

    before = evaluate()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        noise = torch.randn(fixed["pixels"].shape, generator=gen)
        sigmas = sample_sigmas(2, generator=gen)
        losses = module(
            fixed["pixels"], noise, sigmas, fixed["drop_mask"], class_labels=labels, repa_features=features
        )
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    after = evaluate()
    assert after[0] < 0.6 * before[0] and (after[1:] < before[1:]).all()  # both terms went down


def test_align_layer_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="align_layer"):
        PixNerdTrainingModule(tiny_c2i(), REPAProjector(32, 32), align_layer=3)


def test_encode_prompts_equals_the_pipeline_encoding():
    from diffusers_pixnerd import PixNerdFlowMatchScheduler, PixNerdT2IPipeline

    text_encoder, transformer = tiny_qwen3(), PixNerdTransformer2DModel(**TINY_T2I)
    pipe = PixNerdT2IPipeline(transformer, PixNerdFlowMatchScheduler(), text_encoder, qwen3_tokenizer())
    prompts = ["a cat", "two dogs on a very long sofa"]
    expected, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    actual = encode_prompts(text_encoder, qwen3_tokenizer(), prompts, transformer.config, "cpu")
    assert actual.shape == (2, TINY_T2I["text_max_length"], TINY_T2I["text_embed_dim"])
    assert torch.equal(actual, expected)
