"""diffusers' `SchedulerCommonTest` (tests/schedulers/test_schedulers.py) on `PixNerdFlowMatchScheduler`, wired as
diffusers' per-scheduler tests (e.g. tests/schedulers/test_scheduler_euler.py) wire it: a config, the common tests,
and `check_over_configs` / `check_over_forward` over the scheduler's own options."""

import unittest

# Imported as a module: a `SchedulerCommonTest` name here would be collected too (a TestCase with no scheduler).
import tests.schedulers.test_schedulers as diffusers_scheduler_tests

from diffusers_pixnerd import PixNerdFlowMatchScheduler


class PixNerdFlowMatchSchedulerTest(diffusers_scheduler_tests.SchedulerCommonTest):
    scheduler_classes = (PixNerdFlowMatchScheduler,)
    forward_default_kwargs = (("num_inference_steps", 10),)

    def get_scheduler_config(self, **kwargs):
        config = {
            "num_train_timesteps": 1000,
            "shift": 1.0,
            "solver_order": 2,
            "guidance_interval_min": 0.0,
            "guidance_interval_max": 1.0,
        }
        config.update(**kwargs)
        return config

    # `time_step=None` is `default_timestep`, the first entry of the schedule (sigma = 1 whatever the shift): the
    # scheduler, as FlowMatchEulerDiscreteScheduler, steps only from timesteps of its schedule (the mixin's own
    # default, 0, is the end point of the schedule, not a step).

    def test_shifts(self):
        for shift in [1.0, 3.0, 6.0]:
            self.check_over_configs(time_step=None, shift=shift)

    def test_solver_orders(self):
        for solver_order in [1, 2, 3, 4]:
            self.check_over_configs(time_step=None, solver_order=solver_order)

    def test_guidance_intervals(self):
        for low, high in [(0.0, 1.0), (0.1, 1.0), (0.3, 0.7)]:
            self.check_over_configs(time_step=None, guidance_interval_min=low, guidance_interval_max=high)

    def test_inference_steps(self):
        for num_inference_steps in [1, 2, 10, 25, 100]:
            self.check_over_forward(time_step=None, num_inference_steps=num_inference_steps)

    @unittest.skip("A flow-matching scheduler has no betas (as diffusers' EDM scheduler tests skip it).")
    def test_trained_betas(self):
        pass
