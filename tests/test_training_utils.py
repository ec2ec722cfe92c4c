"""Unit tests of the training building blocks: timesteps, loss, REPA, EMA, checkpoints, data (fast, CPU, offline)."""

import json
import os

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import TINY_C2I, TINY_T2I, qwen3_tokenizer, randomize_, tiny_qwen3

from diffusers_pixnerd import PixNerdTransformer2DModel
from diffusers_pixnerd.training import (
    ImageSampleDataset,
    PixNerdTrainingModule,
    REPAProjector,
    adm_center_crop,
    capture_block_output,
    check_output_dir,
    collate_samples,
    commit_checkpoint,
    condition_drop_mask,
    create_ema,
    ema_weights,
    encode_prompts,
    flow_matching_loss,
    image_to_tensor,
    list_checkpoints,
    load_training_dataset,
    pad_to_size,
    random_flip,
    read_class_names,
    remove_temporary_checkpoints,
    repa_target_features,
    resize_center_crop,
    resolve_checkpoint,
    sample_sigmas,
    scan_caption_folder,
    scan_class_folder,
    shift_sigmas,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine they lose a lot to contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=14, image_size=224
    )
    return Dinov2Model(config).eval()


def tiny_c2i(**overrides):
    torch.manual_seed(0)
    return PixNerdTransformer2DModel(**{**TINY_C2I, **overrides})


def save_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def random_image(rng, height, width):
    return (rng.random((height, width, 3)) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- timesteps and loss


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


# ---------------------------------------------------------------------------------------------------------- module


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


# ------------------------------------------------------------------------------------------------------------- EMA


def test_ema_uses_the_constant_official_decay_from_the_first_step():
    model = torch.nn.Linear(3, 2)
    initial = [p.detach().clone() for p in model.parameters()]
    ema = create_ema(model.parameters(), decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model.parameters())
    for shadow, before, after in zip(ema.shadow_params, initial, model.parameters()):
        assert shadow.dtype == torch.float32
        assert torch.allclose(shadow, 0.9 * before + 0.1 * after)  # simple_ema.py, not diffusers' warm-up


def test_ema_warmup_ramps_the_decay_and_forgets_the_initial_weights():
    model = torch.nn.Linear(3, 2)
    initial = [p.detach().clone() for p in model.parameters()]
    ema = create_ema(model.parameters(), decay=0.9, warmup=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model.parameters())  # first update: decay 0, the EMA becomes the current weights
    for shadow, after in zip(ema.shadow_params, model.parameters()):
        assert torch.allclose(shadow, after)
    snapshot = [s.clone() for s in ema.shadow_params]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model.parameters())  # second update: decay (1 + 1) / (10 + 1)
    for shadow, before, after in zip(ema.shadow_params, snapshot, model.parameters()):
        assert torch.allclose(shadow, 2 / 11 * before + 9 / 11 * after)
    for _ in range(200):
        ema.step(model.parameters())
    assert ema.cur_decay_value == pytest.approx(0.9)  # capped at `decay`
    for shadow, before in zip(ema.shadow_params, initial):
        assert torch.allclose(shadow, before + 2.0)  # no trace of the initial weights is left


def test_ema_weights_are_swapped_in_and_restored():
    model = torch.nn.Linear(3, 2)
    ema = create_ema(model.parameters(), decay=0.5)
    trained = [p.detach().clone() + 1 for p in model.parameters()]
    with torch.no_grad():
        for p, t in zip(model.parameters(), trained):
            p.copy_(t)
    ema.step(model.parameters())
    with ema_weights(ema, list(model.parameters())):
        assert torch.allclose(model.weight, ema.shadow_params[0])
    assert torch.equal(model.weight, trained[0])


# ----------------------------------------------------------------------------------------------------- checkpoints


def make_checkpoint(output_dir, name):
    """A complete checkpoint folder: its state file is there (written last by a real save)."""
    os.makedirs(os.path.join(output_dir, name))
    with open(os.path.join(output_dir, name, "model.safetensors"), "w") as f:
        f.write(name)
    with open(os.path.join(output_dir, name, "training_state.json"), "w") as f:
        f.write("{}")


def test_latest_ignores_a_checkpoint_whose_save_was_killed(tmp_path):
    make_checkpoint(tmp_path, "checkpoint-10")
    make_checkpoint(tmp_path, "checkpoint-2")
    make_checkpoint(tmp_path, "checkpoint-20.tmp")  # killed mid-save: never renamed
    assert [step for step, _ in list_checkpoints(str(tmp_path))] == [2, 10]
    assert resolve_checkpoint(str(tmp_path), "latest") == os.path.join(tmp_path, "checkpoint-10")
    remove_temporary_checkpoints(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10", "checkpoint-2"]


def test_commit_renames_then_prunes_to_the_total_limit(tmp_path):
    for step in (1, 2, 3):
        make_checkpoint(tmp_path, f"checkpoint-{step}")
    make_checkpoint(tmp_path, "checkpoint-4.tmp")
    final = commit_checkpoint(os.path.join(tmp_path, "checkpoint-4.tmp"), total_limit=2)
    assert final == os.path.join(tmp_path, "checkpoint-4")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-3", "checkpoint-4"]


def test_commit_replaces_a_checkpoint_of_the_same_step(tmp_path):
    make_checkpoint(tmp_path, "checkpoint-4")
    os.makedirs(tmp_path / "checkpoint-4.tmp")
    (tmp_path / "checkpoint-4.tmp" / "new").write_text("x")
    commit_checkpoint(str(tmp_path / "checkpoint-4.tmp"))
    assert os.listdir(tmp_path / "checkpoint-4") == ["new"]


def test_resume_from_missing_checkpoint_name_is_an_error(tmp_path):
    assert resolve_checkpoint(str(tmp_path), "latest") is None
    with pytest.raises(ValueError, match="resume_from_checkpoint"):
        resolve_checkpoint(str(tmp_path), "checkpoint-7")


def test_an_earlier_run_needs_resume_or_overwrite(tmp_path):
    check_output_dir(str(tmp_path), None, False)  # empty: fine
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        check_output_dir(str(tmp_path), None, False)
    check_output_dir(str(tmp_path), None, True)
    check_output_dir(str(tmp_path), "latest", False)


# ------------------------------------------------------------------------------------------------------------ data


def test_adm_center_crop_box_halves_then_crops_the_centre():
    # 64 x 64 of 4 x 4 blocks: two BOX halvings make each block one pixel, no resize left to do.
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = PIL.Image.fromarray(np.repeat(np.repeat(blocks, 4, 0), 4, 1)).convert("RGB")
    assert np.array_equal(np.asarray(adm_center_crop(image, 16))[..., 0], blocks)
    # A wide image keeps its centre columns.
    columns = np.tile(np.arange(48, dtype=np.uint8), (16, 1))
    cropped = np.asarray(adm_center_crop(PIL.Image.fromarray(columns).convert("RGB"), 16))[..., 0]
    assert np.array_equal(cropped[0], np.arange(16, 32))


def test_resize_center_crop_follows_torchvision():
    image = PIL.Image.fromarray(random_image(np.random.default_rng(0), 20, 40))  # W 40, H 20
    out = resize_center_crop(image, 10)
    expected = image.resize((20, 10), resample=PIL.Image.BILINEAR).crop((5, 0, 15, 10))
    assert out.size == (10, 10) and np.array_equal(np.asarray(out), np.asarray(expected))


def test_pad_turns_28x28_grayscale_into_centred_32x32_rgb():
    gray = np.full((28, 28), 200, dtype=np.uint8)
    padded = np.asarray(pad_to_size(PIL.Image.fromarray(gray).convert("RGB"), 32))
    assert padded.shape == (32, 32, 3)
    assert (padded[2:30, 2:30] == 200).all() and padded[:2].sum() == 0 and padded[:, 30:].sum() == 0


def test_image_to_tensor_maps_to_minus_one_one():
    tensor = image_to_tensor(PIL.Image.fromarray(np.array([[[0, 255, 127]]], dtype=np.uint8)))
    assert tensor.shape == (3, 1, 1) and tensor.flatten().tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1])


def test_class_folder_layout_and_its_errors(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b_dog", "a_cat"):
        save_png(tmp_path / "data" / name / "0.png", random_image(rng, 8, 8))
    save_png(tmp_path / "data" / "a_cat" / "sub" / "1.png", random_image(rng, 8, 8))
    paths, labels, names = scan_class_folder(str(tmp_path / "data"))
    assert names == ["a_cat", "b_dog"] and labels == [0, 0, 1] and len(paths) == 3
    save_png(tmp_path / "flat" / "0.png", random_image(rng, 8, 8))
    with pytest.raises(ValueError, match="one subfolder per class"):
        scan_class_folder(str(tmp_path / "flat"))
    os.makedirs(tmp_path / "empty" / "cls")
    with pytest.raises(ValueError, match="no images"):
        scan_class_folder(str(tmp_path / "empty"))


def test_caption_layouts_and_their_errors(tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "txt" / "a.png", random_image(rng, 8, 8))
    (tmp_path / "txt" / "a.txt").write_text("a cat\n")
    save_png(tmp_path / "txt" / "uncaptioned.png", random_image(rng, 8, 8))
    assert scan_caption_folder(str(tmp_path / "txt")) == ([str(tmp_path / "txt" / "a.png")], ["a cat"])
    save_png(tmp_path / "meta" / "x.png", random_image(rng, 8, 8))
    (tmp_path / "meta" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "caption": "dog"}) + "\n")
    assert scan_caption_folder(str(tmp_path / "meta"), "caption")[1] == ["dog"]
    with pytest.raises(ValueError, match="caption_column"):
        scan_caption_folder(str(tmp_path / "meta"), "text")
    save_png(tmp_path / "none" / "x.png", random_image(rng, 8, 8))
    with pytest.raises(ValueError, match="no captioned images"):
        scan_caption_folder(str(tmp_path / "none"))


def test_dataset_columns_are_checked_and_renamed(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    save_png(tmp_path / "0.png", random_image(rng, 8, 8))
    table = datasets.Dataset.from_dict(
        {"img": [str(tmp_path / "0.png")], "cls": [3], "note": ["x"]},
        features=datasets.Features(
            {"img": datasets.Image(), "cls": datasets.Value("int64"), "note": datasets.Value("string")}
        ),
    )
    os.makedirs(tmp_path / "hub")
    table.to_parquet(str(tmp_path / "hub" / "train.parquet"))
    dataset, names = load_training_dataset(dataset_name=str(tmp_path / "hub"), image_column="img", label_column="cls")
    assert dataset.column_names == ["image", "label"] and dataset[0]["label"] == 3 and names is None
    assert isinstance(dataset[0]["image"], dict)  # left undecoded: decoded (or skipped) in the loader workers
    with pytest.raises(ValueError, match=r"`--label_column` 'label' is not a column .*'cls'"):
        load_training_dataset(dataset_name=str(tmp_path / "hub"), image_column="img", label_column="label")
    with pytest.raises(ValueError, match="caption_column"):
        load_training_dataset(dataset_name=str(tmp_path / "hub"), image_column="img", caption_column="text")


def corrupt_folder(tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "c" / "0.png", random_image(rng, 8, 8))
    (tmp_path / "c" / "1.png").write_bytes(b"not a png")
    save_png(tmp_path / "big.png", random_image(rng, 64, 64))
    (tmp_path / "c" / "2.png").write_bytes((tmp_path / "big.png").read_bytes()[:200])  # truncated: header only
    save_png(tmp_path / "c" / "3.png", random_image(rng, 8, 8))
    os.remove(tmp_path / "big.png")
    dataset, _ = load_training_dataset(str(tmp_path), label_column="label")
    return dataset


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    samples = ImageSampleDataset(corrupt_folder(tmp_path), 8, "adm_center_crop")
    items = [samples[i] for i in range(4)]
    assert [item["num_skipped"] for item in items] == [0, 2, 1, 0]  # rows 1 and 2 fall through to row 3
    assert torch.equal(items[1]["pixel_values"], items[3]["pixel_values"])
    batch = collate_samples(items)
    assert batch["num_skipped"] == 3 and batch["pixel_values"].shape == (4, 3, 8, 8)


def test_fail_on_corrupt_images_names_the_file(tmp_path):
    samples = ImageSampleDataset(corrupt_folder(tmp_path), 8, "adm_center_crop", fail_on_corrupt_images=True)
    with pytest.raises(RuntimeError, match="1.png"):
        samples[1]


def test_class_names_from_the_flag(tmp_path):
    assert read_class_names(None, ["a"]) == ["a"]
    assert read_class_names("x, y", None) == ["x", "y"]
    assert len(read_class_names("imagenet", None)) == 1000
    (tmp_path / "names.json").write_text(json.dumps({"0": "zero", "1": "one"}))
    assert read_class_names(str(tmp_path / "names.json"), None) == ["zero", "one"]


# --------------------------------------------------------------------------------------------- launcher configs


def test_fsdp_config_wraps_the_pixnerd_blocks():
    import yaml
    from accelerate.utils import FullyShardedDataParallelPlugin

    with open(os.path.join(ROOT, "examples", "accelerate_configs", "fsdp.yaml")) as f:
        config = yaml.safe_load(f)
    fsdp = config["fsdp_config"]
    assert config["distributed_type"] == "FSDP"
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=fsdp["fsdp_version"],
        auto_wrap_policy=fsdp["fsdp_auto_wrap_policy"],
        transformer_cls_names_to_wrap=fsdp["fsdp_transformer_layer_cls_to_wrap"].split(","),
        state_dict_type=fsdp["fsdp_state_dict_type"],
    )
    plugin.set_auto_wrap_policy(PixNerdTrainingModule(tiny_c2i(), REPAProjector(32, 32), align_layer=1))
    names = {cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]}
    assert names == {"PixNerdTransformerBlock", "PixNerdNeuralField"}


def test_deepspeed_config_is_zero2_with_clipping():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(os.path.join(ROOT, "examples", "accelerate_configs", "deepspeed_zero2.yaml"))
    assert config.distributed_type == "DEEPSPEED"
    assert config.deepspeed_config["zero_stage"] == 2 and config.deepspeed_config["gradient_clipping"] == 1.0


def test_push_uploads_the_run_without_checkpoints_logs_and_intermediate_samples(tmp_path, monkeypatch):
    import fnmatch
    from argparse import Namespace
    from types import SimpleNamespace

    import huggingface_hub

    from diffusers_pixnerd.training import push_folder

    uploads = {}
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: SimpleNamespace(repo_id=f"me/{repo_id}"))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: uploads.update(kw))
    args = Namespace(hub_model_id=None, output_dir=str(tmp_path / "my-run"), hub_token=None, logging_dir="logs")
    assert push_folder(args) == "me/my-run" and uploads["repo_id"] == "me/my-run"

    def ignored(path):
        return any(fnmatch.fnmatch(path, pattern) for pattern in uploads["ignore_patterns"])

    assert ignored("checkpoint-10/model.safetensors") and ignored("logs/pixnerd/events.out")
    assert ignored("validation/step-20/00_cat.png") and ignored("cache/prompt_embeds_0.arrow")
    assert not ignored("validation/final/00_cat.png") and not ignored("transformer/config.json")


def test_metadata_jsonl_errors_name_the_line_and_null_captions_are_the_empty_prompt(tmp_path):
    from diffusers_pixnerd.training import scan_caption_folder

    def write(*lines):
        (tmp_path / "metadata.jsonl").write_text("\n".join(lines))

    write('{"file_name": "a.png", "text": "a cat"}', "", '{"file_name": "b.png", "text": null}')
    paths, captions = scan_caption_folder(str(tmp_path))
    assert captions == ["a cat", ""] and [os.path.basename(p) for p in paths] == ["a.png", "b.png"]
    write('{"file_name": "a.png", "text": "a cat"}', '{"file_name": "b.png", "text": ')
    with pytest.raises(ValueError, match="metadata.jsonl line 2 is not valid JSON"):
        scan_caption_folder(str(tmp_path))
    write('{"file_name": "a.png", "text": 3}')
    with pytest.raises(ValueError, match="line 1: the caption \\('text'\\) must be a string or null, got 3"):
        scan_caption_folder(str(tmp_path))
    write('["a.png", "a cat"]')
    with pytest.raises(ValueError, match="line 1 has the keys list"):
        scan_caption_folder(str(tmp_path))


def test_16_bit_palette_and_alpha_images_convert_to_the_right_rgb(tmp_path):
    import PIL.Image

    from diffusers_pixnerd.training import open_image

    gray16 = np.full((4, 4), 32768, dtype=np.uint16)  # half of the 16-bit range: mid gray, not white
    PIL.Image.fromarray(gray16).save(tmp_path / "gray16.png")
    assert PIL.Image.open(tmp_path / "gray16.png").mode.startswith("I")
    assert np.asarray(open_image(str(tmp_path / "gray16.png"))).max() == 128

    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, but only the left half opaque
    rgba[:, :2, 3] = 255
    PIL.Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rgb = np.asarray(open_image(str(tmp_path / "alpha.png")))
    assert rgb[:, :2].tolist() == [[[255, 0, 0]] * 2] * 4 and rgb[:, 2:].max() == 0  # transparent -> black

    palette = PIL.Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    assert np.asarray(open_image(str(tmp_path / "palette.png"))).tolist() == [[[0, 200, 0]] * 4] * 4


def test_checkpoint_weights_for_evaluation_are_the_ema_or_the_trained_ones(tmp_path):
    from safetensors.torch import save_file

    from diffusers_pixnerd.training import load_checkpoint_weights
    from diffusers_pixnerd.training.ema import create_ema, save_ema

    trained, evaluated = tiny_c2i(), tiny_c2i()
    randomize_(trained)
    save_file(
        {f"transformer.{k}": v.contiguous() for k, v in trained.state_dict().items()}, tmp_path / "model.safetensors"
    )
    ema = create_ema(trained.parameters(), decay=0.5)
    with torch.no_grad():
        for shadow in ema.shadow_params:
            shadow.mul_(2.0)
    save_ema(ema, str(tmp_path / "ema.safetensors"))
    assert load_checkpoint_weights(evaluated, str(tmp_path)) == "ema"
    assert all(torch.equal(a, 2.0 * b) for a, b in zip(evaluated.parameters(), trained.parameters()))
    assert load_checkpoint_weights(evaluated, str(tmp_path), use_ema=False) == "trained"
    assert all(torch.equal(a, b) for a, b in zip(evaluated.parameters(), trained.parameters()))
