"""PixNerdFlowMatchScheduler (schedulers/scheduling_pixnerd.py): grid, solver accuracy, guidance interval, official
parity, config, misuse."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors import safe_open

from diffusers_pixnerd.schedulers import (
    OFFICIAL_SCHEDULER_PRESETS,
    PixNerdFlowMatchScheduler,
    PixNerdFlowMatchSchedulerOutput,
)
from diffusers_pixnerd.schedulers.scheduling_pixnerd import adams_coefficients

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from generate_scheduler_fixtures import NUM_CLASSES, fake_network  # noqa: E402  (the network of the fixtures)

FIXTURE = ROOT / "tests" / "fixtures" / "official_sampler.safetensors"


# ------------------------------------------------------------------------------------------------------------ the grid


def test_default_grid_is_official_shifted_uniform_grid():
    scheduler = PixNerdFlowMatchScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    t = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    expected_sigmas = 1 - t / (t + (1 - t) * 3.0)
    np.testing.assert_allclose(scheduler.sigmas.numpy(), expected_sigmas, atol=1e-7)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), expected_sigmas[:-1] * 1000, rtol=1e-6)
    assert scheduler.sigmas[0] == 1.0 and scheduler.sigmas[-1] == 0.0
    assert scheduler.timesteps.dtype == scheduler.sigmas.dtype == torch.float32


def test_set_timesteps_defaults_to_config_num_inference_steps():
    scheduler = PixNerdFlowMatchScheduler(num_inference_steps=7)
    scheduler.set_timesteps()
    assert scheduler.num_inference_steps == 7 and len(scheduler.timesteps) == 7


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_shift_matches_flow_match_euler_sigma_shift(shift):
    scheduler = PixNerdFlowMatchScheduler(shift=shift)
    scheduler.set_timesteps(10)
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    torch.testing.assert_close(scheduler.sigmas, reference.sigmas, rtol=0, atol=2e-7)


def test_custom_sigmas_are_shifted_like_the_default_grid():
    scheduler = PixNerdFlowMatchScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    custom = scheduler.sigmas.clone()
    scheduler.set_timesteps(10)
    torch.testing.assert_close(custom, scheduler.sigmas, rtol=0, atol=2e-7)


# ---------------------------------------------------------------------------------------------------------- the solver


def sample_linear_ode(scheduler, num_inference_steps, x=1.0):
    """Integrates d x / d sigma = cos(3 sigma) x from sigma 1 to 0 with the scheduler; returns x at sigma 0."""
    scheduler.set_timesteps(num_inference_steps)
    x = torch.tensor([x], dtype=torch.float64)
    for t in scheduler.timesteps:
        x = scheduler.step(torch.cos(3 * t.double() / 1000) * x, t, x).prev_sample
    return x.item()


@pytest.mark.parametrize("solver_order, expected_ratio", [(1, 2.0), (2, 4.0)])
def test_error_falls_with_the_order_of_convergence(solver_order, expected_ratio):
    # d x / d sigma = cos(3 sigma) x has x(0) = x(1) * exp(-sin(3) / 3); shift 3 makes the steps uneven.
    scheduler = PixNerdFlowMatchScheduler(solver_order=solver_order, shift=3.0)
    exact = math.exp(-math.sin(3.0) / 3.0)
    errors = [abs(sample_linear_ode(scheduler, n) - exact) for n in (40, 80, 160)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(abs(r / expected_ratio - 1) < 0.06 for r in ratios), ratios


@pytest.mark.parametrize("solver_order", [1, 2, 3, 4])
def test_coefficients_of_every_step_sum_to_one(solver_order):
    scheduler = PixNerdFlowMatchScheduler(solver_order=solver_order, shift=3.0)
    scheduler.set_timesteps(12)
    for i in range(12):
        coefficients = scheduler._multistep_coefficients(i, min(solver_order, i + 1))
        assert len(coefficients) == min(solver_order, i + 1)
        assert math.isclose(sum(coefficients), 1.0, abs_tol=1e-12)


def test_adams2_coefficients_match_variable_step_formula():
    # Variable-step AB2: x += h * ((1 + h / (2 h_prev)) v_n - h / (2 h_prev) v_{n-1}); uniform steps give (-1/2, 3/2).
    assert adams_coefficients([1.0, 0.9], 0.9, 0.8) == pytest.approx([-0.5, 1.5], abs=1e-12)
    h_prev, h = -0.3, -0.1
    expected = [-h / (2 * h_prev), 1 + h / (2 * h_prev)]
    assert adams_coefficients([1.0, 0.7], 0.7, 0.6) == pytest.approx(expected, abs=1e-12)


def test_first_step_is_euler_and_second_uses_two_outputs():
    scheduler = PixNerdFlowMatchScheduler(solver_order=2)
    scheduler.set_timesteps(4)
    x, v0, v1 = torch.ones(1), torch.full((1,), 2.0), torch.full((1,), 4.0)
    x1 = scheduler.step(v0, scheduler.timesteps[0], x).prev_sample
    x2 = scheduler.step(v1, scheduler.timesteps[1], x1).prev_sample
    assert x1.item() == pytest.approx(1.0 - 0.25 * 2.0)
    assert x2.item() == pytest.approx(x1.item() - 0.25 * (1.5 * 4.0 - 0.5 * 2.0))


def run_steps(scheduler, num_inference_steps, velocity_fn, sample):
    """A sampling loop without guidance; `velocity_fn(x, sigma)` plays the model."""
    scheduler.set_timesteps(num_inference_steps)
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity_fn(sample, t / 1000), t, sample).prev_sample
    return sample


def smooth_velocity(x, sigma):
    return torch.sin(x) * (1 + sigma) - 0.3 * x


def test_solver_order_1_matches_flow_match_euler_trajectory():
    torch.manual_seed(0)
    noise = torch.randn(2, 3, 4, 4)
    ours = run_steps(PixNerdFlowMatchScheduler(solver_order=1, shift=3.0), 10, smooth_velocity, noise)
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(sigmas=np.linspace(1.0, 0.1, 10))
    sample = noise
    for t in reference.timesteps:
        sample = reference.step(smooth_velocity(sample, t / 1000), t, sample).prev_sample
    torch.testing.assert_close(ours, sample, rtol=1e-5, atol=1e-6)


def test_pred_original_sample_is_exact_for_a_straight_path():
    torch.manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    scheduler = PixNerdFlowMatchScheduler(shift=3.0)
    scheduler.set_timesteps(5)
    sample = noise
    for t in scheduler.timesteps:
        output = scheduler.step(noise - x0, t, sample)
        torch.testing.assert_close(output.pred_original_sample, x0, rtol=0, atol=1e-5)
        sample = output.prev_sample
    torch.testing.assert_close(sample, x0, rtol=0, atol=1e-5)


def test_bfloat16_sample_is_computed_in_float32_and_returned_in_bfloat16():
    torch.manual_seed(0)
    sample, model_output = torch.randn(2, 3, 4, 4).bfloat16(), torch.randn(2, 3, 4, 4).bfloat16()
    scheduler = PixNerdFlowMatchScheduler(solver_order=1)
    scheduler.set_timesteps(3)
    prev_sample = scheduler.step(model_output, scheduler.timesteps[0], sample).prev_sample
    dt = (scheduler.sigmas[1] - scheduler.sigmas[0]).item()
    expected = (sample.float() + dt * model_output.float()).bfloat16()
    assert prev_sample.dtype == torch.bfloat16
    assert torch.equal(prev_sample, expected)


def test_set_timesteps_resets_the_multistep_history():
    torch.manual_seed(0)
    noise = torch.randn(2, 3, 4, 4)
    scheduler = PixNerdFlowMatchScheduler(solver_order=2)
    first = run_steps(scheduler, 6, smooth_velocity, noise)
    second = run_steps(scheduler, 6, smooth_velocity, noise)
    assert torch.equal(first, second)


def test_begin_index_starts_the_history_at_that_step():
    scheduler = PixNerdFlowMatchScheduler(solver_order=2)
    scheduler.set_timesteps(4)
    scheduler.set_begin_index(2)
    x = scheduler.step(torch.full((1,), 2.0), scheduler.timesteps[2], torch.ones(1)).prev_sample
    assert scheduler.step_index == 3
    assert x.item() == pytest.approx(1.0 - 0.25 * 2.0)  # an Euler step: nothing before step 2 is in the history


# ------------------------------------------------------------------------------------------------------------ guidance


def guided_steps(scheduler, guidance_interval=None):
    return [scheduler.is_guidance_active(t, guidance_interval) for t in scheduler.timesteps]


def test_guidance_skipped_on_the_first_step_by_default():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(4)
    assert guided_steps(scheduler) == [False, True, True, True]


def test_guidance_interval_is_strict_at_both_ends():
    # With 4 steps and no shift the grid is t = 0, 0.25, 0.5, 0.75, exact in float32.
    scheduler = PixNerdFlowMatchScheduler(guidance_interval_min=0.25, guidance_interval_max=0.75)
    scheduler.set_timesteps(4)
    assert guided_steps(scheduler) == [False, False, True, False]


def test_grid_point_equal_to_the_edge_in_float32_is_unguided():
    # With 20 steps t_2 is float32(0.1); the official compares in float32, so 0.1 < t fails there.
    scheduler = PixNerdFlowMatchScheduler(guidance_interval_min=0.1)
    scheduler.set_timesteps(20)
    assert guided_steps(scheduler)[:4] == [False, False, False, True]


def test_guidance_interval_override_replaces_the_config_interval():
    scheduler = PixNerdFlowMatchScheduler(guidance_interval_min=0.25, guidance_interval_max=0.75)
    scheduler.set_timesteps(4)
    assert guided_steps(scheduler, (0.2, 0.8)) == [False, True, True, True]
    assert guided_steps(scheduler, (0.0, 0.3)) == [False, True, False, False]
    assert guided_steps(scheduler, (0.5, 0.5)) == [False, False, False, False]  # empty interval: never guided


def test_guidance_without_timestep_follows_the_step_index():
    scheduler = PixNerdFlowMatchScheduler(solver_order=1)
    scheduler.set_timesteps(4)
    flags, sample = [], torch.zeros(1)
    for t in scheduler.timesteps:
        flags.append(scheduler.is_guidance_active())
        sample = scheduler.step(sample, t, sample).prev_sample
    assert flags == [False, True, True, True]


# ----------------------------------------------------------------------------------------------------- official parity


def load_official_fixture():
    tensors = {}
    with safe_open(FIXTURE, framework="pt") as f:
        metadata = f.metadata()
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, json.loads(metadata["runs"]), float(metadata["guidance_scale"])


OFFICIAL_TENSORS, OFFICIAL_RUNS, OFFICIAL_GUIDANCE_SCALE = load_official_fixture()


OFFICIAL_TENSORS, OFFICIAL_RUNS, OFFICIAL_GUIDANCE_SCALE = load_official_fixture()


OFFICIAL_TENSORS, OFFICIAL_RUNS, OFFICIAL_GUIDANCE_SCALE = load_official_fixture()


@pytest.mark.parametrize("name", sorted(OFFICIAL_RUNS))
def test_trajectory_matches_official_sampler(name):
    """Replays scripts/generate_scheduler_fixtures.py with our scheduler, to rtol 1e-5 and atol 1e-6.

    Order 3 gets atol 1e-4: the official order-3 coefficients lose up to 3e-5 to float32 cancellation in
    pre_integral.py (`lagrange_preint_o3`); ours are computed in float64.
    """
    run, tensors = OFFICIAL_RUNS[name], OFFICIAL_TENSORS
    low, high = run["interval"]
    scheduler = PixNerdFlowMatchScheduler(
        shift=run["shift"], solver_order=run["solver_order"], guidance_interval_min=low, guidance_interval_max=high
    )
    scheduler.set_timesteps(run["num_inference_steps"])
    labels = tensors["class_labels"]
    class_labels = torch.cat([torch.full_like(labels, NUM_CLASSES), labels])  # [uncond, cond], as the official
    sample, trajectory = tensors["noise"], [tensors["noise"]]
    for t in scheduler.timesteps:
        official_t = (1 - t / 1000).repeat(2 * sample.shape[0])
        # Our model output is noise - x0, the opposite of the official network's x0 - noise.
        out = -fake_network(
            torch.cat([sample, sample]), official_t, class_labels, tensors["weight"], tensors["class_emb"]
        )
        uncond, cond = out.chunk(2)
        guidance_scale = OFFICIAL_GUIDANCE_SCALE if scheduler.is_guidance_active(t) else 1.0
        sample = scheduler.step(uncond + guidance_scale * (cond - uncond), t, sample).prev_sample
        trajectory.append(sample)
    atol = 1e-4 if run["solver_order"] == 3 else 1e-6
    torch.testing.assert_close(torch.stack(trajectory), tensors[f"{name}.trajectory"], rtol=1e-5, atol=atol)


# -------------------------------------------------------------------------------------------------------------- config


def test_config_round_trip(tmp_path):
    scheduler = PixNerdFlowMatchScheduler.from_official_preset("t2i")
    scheduler.save_config(tmp_path)
    loaded = PixNerdFlowMatchScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(scheduler.config)
    assert public(PixNerdFlowMatchScheduler.from_config(loaded.config).config) == public(scheduler.config)
    assert (
        loaded.config.shift == 3.0 and loaded.config.num_inference_steps == 25 and loaded.config.guidance_scale == 4.0
    )


@pytest.mark.parametrize("name", sorted(OFFICIAL_SCHEDULER_PRESETS))
def test_official_presets_set_the_paper_settings(name):
    config = PixNerdFlowMatchScheduler.from_official_preset(name).config
    expected = {
        "c2i-euler100": (1, 100, 3.5, 1.0, 0.1, 1.0),
        "c2i-adams50": (2, 50, 3.5, 1.0, 0.1, 1.0),
        "t2i": (2, 25, 4.0, 3.0, 0.0, 1.0),
    }[name]
    got = (config.solver_order, config.num_inference_steps, config.guidance_scale, config.shift,
           config.guidance_interval_min, config.guidance_interval_max)  # fmt: skip
    assert got == expected


def test_preset_accepts_overrides():
    assert (
        PixNerdFlowMatchScheduler.from_official_preset("t2i", num_inference_steps=10).config.num_inference_steps == 10
    )


def test_add_noise_interpolates_noise_and_data():
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    scheduler = PixNerdFlowMatchScheduler()
    noisy = scheduler.add_noise(x0, noise, torch.tensor([250.0, 1000.0]))
    assert noisy[0].eq(0.25).all() and noisy[1].eq(1.0).all()
    assert scheduler.scale_noise(x0, torch.tensor([500.0]), noise).eq(0.5).all()


def test_scheduler_takes_numpy_numbers():
    scheduler = PixNerdFlowMatchScheduler(solver_order=np.int64(1), shift=np.float32(2.0))
    scheduler.set_timesteps(np.int64(4))
    assert len(scheduler.timesteps) == 4


# -------------------------------------------------------------------------------------------------------------- misuse


def test_step_before_set_timesteps_raises():
    with pytest.raises(ValueError, match="set_timesteps"):
        PixNerdFlowMatchScheduler().step(torch.zeros(1), 1000.0, torch.zeros(1))


def test_timestep_not_in_schedule_raises():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="not in the schedule"):
        scheduler.step(torch.zeros(1), 123.0, torch.zeros(1))


def test_out_of_order_timestep_raises():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(4)
    scheduler.step(torch.zeros(1), scheduler.timesteps[0], torch.zeros(1))
    with pytest.raises(ValueError, match="in order"):
        scheduler.step(torch.zeros(1), scheduler.timesteps[2], torch.zeros(1))


def test_too_many_steps_raise():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        scheduler.step(torch.zeros(1), t, torch.zeros(1))
    with pytest.raises(ValueError, match="steps are done"):
        scheduler.step(torch.zeros(1), scheduler.timesteps[-1], torch.zeros(1))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(solver_order=5), "solver_order"),
        (dict(shift=0.0), "shift"),
        (dict(guidance_interval_min=0.6, guidance_interval_max=0.5), "guidance_interval_min"),
        (dict(guidance_interval_min=-0.1), "guidance_interval_min"),
        (dict(num_inference_steps=0), "num_inference_steps"),
    ],
)
def test_invalid_config_raises(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        PixNerdFlowMatchScheduler(**kwargs)


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"shift": float("nan")}, "shift"),
        ({"shift": float("inf")}, "shift"),
        ({"shift": 0.0}, "shift"),
        ({"shift": "3"}, "shift"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"num_train_timesteps": 1000.5}, "num_train_timesteps"),
        ({"solver_order": 2.0}, "solver_order"),
        ({"solver_order": 5}, "solver_order"),
        ({"solver_order": True}, "solver_order"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": float("inf")}, "guidance_scale"),
        ({"guidance_interval_min": float("nan")}, r"\(guidance_interval_min"),
    ],
)
def test_scheduler_config_errors_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        PixNerdFlowMatchScheduler(**kwargs)


@pytest.mark.parametrize("sigmas", [[0.5, 0.8], [1.0, 0.0], [1.5, 0.5], []])
def test_invalid_sigmas_raise(sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        PixNerdFlowMatchScheduler().set_timesteps(sigmas=sigmas)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_custom_sigmas_are_an_error(bad):
    scheduler = PixNerdFlowMatchScheduler()
    with pytest.raises(ValueError, match="`sigmas` must be a non-empty, strictly decreasing 1-D sequence of finite"):
        scheduler.set_timesteps(sigmas=[1.0, bad, 0.25])


def test_invalid_guidance_interval_override_raises():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="guidance_interval"):
        scheduler.is_guidance_active(guidance_interval=(0.9, 0.1))
    with pytest.raises(ValueError, match="guidance_interval"):
        scheduler.is_guidance_active(guidance_interval=(-1.0, 0.3))


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="c2i-euler100"):
        PixNerdFlowMatchScheduler.from_official_preset("c2i")


def test_step_returns_tuple_without_return_dict():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(2)
    output = scheduler.step(torch.ones(1), scheduler.timesteps[0], torch.ones(1), return_dict=False)
    assert isinstance(output, tuple) and output[0].item() == pytest.approx(0.5) and output[1].item() == 0.0
    assert PixNerdFlowMatchSchedulerOutput(prev_sample=output[0]).pred_original_sample is None


def test_step_with_a_model_output_of_another_shape_is_an_error():
    scheduler = PixNerdFlowMatchScheduler()
    scheduler.set_timesteps(4)
    sample_ = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"`model_output` has shape \(1, 3, 8, 4\) but `sample` \(1, 3, 8, 8\)"):
        scheduler.step(torch.zeros(1, 3, 8, 4), scheduler.timesteps[0], sample_)


def test_a_string_step_count_and_a_begin_index_past_the_end_are_named_with_their_values():
    scheduler = PixNerdFlowMatchScheduler()
    with pytest.raises(ValueError, match=r"`num_inference_steps` must be a positive integer, got '3'\."):
        scheduler.set_timesteps("3")
    scheduler.set_timesteps(4)
    with pytest.raises(
        ValueError,
        match=r"`begin_index` 4 is past the end of the schedule: its 4 steps have the "
        r"indices 0 to 3\.",
    ):
        scheduler.set_begin_index(4)
    with pytest.raises(ValueError, match=r"`begin_index` must be a non-negative integer, got '1'\."):
        scheduler.set_begin_index("1")
    scheduler.set_begin_index(3)
    assert scheduler.begin_index == 3
