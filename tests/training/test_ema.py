"""training/ema.py: the EMA of the weights: the official constant decay, diffusers' warmup ramp, the weights swapped in
and restored, an EMA updated every N steps, EMA shards of sharded runs."""

import pytest
import torch

from diffusers_pixnerd.training import create_ema, ema_weights, training_ema, update_ema
from diffusers_pixnerd.training.ema import restart_ema

pytestmark = pytest.mark.usefixtures("single_thread")


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


def test_a_runs_ema_chooses_its_decay_and_warns_when_the_start_would_linger(caplog):
    model = torch.nn.Linear(3, 2)
    with caplog.at_level("INFO", logger="diffusers_pixnerd.training.ema"):
        ema, decay = training_ema(list(model.parameters()), max_train_steps=100)
    assert decay == pytest.approx(0.9) and ema.decay == pytest.approx(0.9)  # 1 - 10 / steps
    assert "EMA decay 0.9, chosen from the run length (100 steps)" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="diffusers_pixnerd.training.ema"):
        ema, decay = training_ema(list(model.parameters()), 100, decay=0.999, update_interval=2)
    assert decay == 0.999 and ema.decay == pytest.approx(0.999**2)  # per update, every 2 steps
    assert "still make up 90% of the exported EMA after 100 steps" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="diffusers_pixnerd.training.ema"):
        training_ema(list(model.parameters()), 100, decay=0.999, resuming=True)  # warned when the run began
        training_ema(list(model.parameters()), 100, decay=0.999, warmup=True)  # the warm-up forgets the start
    assert "still make up" not in caplog.text


def test_restarting_an_ema_starts_it_from_the_current_weights():
    model = torch.nn.Linear(3, 2)
    ema = create_ema(model.parameters(), decay=0.5, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, list(model.parameters()))
    restart_ema(ema, list(model.parameters()))
    assert ema.optimization_step == 0
    for shadow, p in zip(ema.shadow_params, model.parameters()):
        assert shadow.dtype == torch.float32 and torch.equal(shadow, p.detach())


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


def test_an_ema_updated_every_n_steps_uses_the_decay_to_the_power_n_and_lives_apart():
    weight = torch.nn.Parameter(torch.zeros(3))
    ema = create_ema([weight], decay=0.9, update_interval=2, device="cpu")
    assert ema.decay == pytest.approx(0.81)
    expected = torch.zeros(3)
    for step in range(1, 7):
        with torch.no_grad():
            weight.add_(1.0)
        if step % 2 == 0:
            update_ema(ema, [weight])
            expected = 0.81 * expected + 0.19 * weight.detach()
    assert torch.allclose(ema.shadow_params[0], expected) and expected[0] == pytest.approx(2.0049, abs=1e-4)
    assert ema.shadow_params[0].data_ptr() != weight.data_ptr()  # a copy, not the trained tensor


def test_an_ema_shard_of_another_shape_names_the_file(tmp_path):
    from diffusers_pixnerd.training.ema import create_ema, shard_like

    parameters = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(2))]
    ema = create_ema(parameters, decay=0.5)
    ema.shadow_params = [torch.full((4, 3), 2.0, dtype=torch.float64), torch.full((2,), 3.0)]
    shard_like(ema, parameters, "ema-rank0.safetensors")
    assert [s.dtype for s in ema.shadow_params] == [torch.float32, torch.float32]
    assert torch.equal(ema.shadow_params[0], torch.full((4, 3), 2.0))
    ema.shadow_params = [torch.ones(2, 3), torch.ones(2)]  # half the rows: written by twice the processes
    with pytest.raises(ValueError, match=r"ema-rank0.safetensors: EMA tensor 0 has the shape \(2, 3\).*\(4, 3\)"):
        shard_like(ema, parameters, "ema-rank0.safetensors")
    ema.shadow_params = [torch.ones(4, 3)]
    with pytest.raises(ValueError, match="ema-rank0.safetensors holds 1 EMA tensors, the trained model 2"):
        shard_like(ema, parameters, "ema-rank0.safetensors")
