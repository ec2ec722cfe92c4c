# Copyright 2026 The diffusers-pixnerd authors. MIT License.
"""The flow-matching sampler of PixNerd: Euler or Adams-Bashforth on a shifted grid, with interval guidance."""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging

from ..utils import check_guidance_interval, is_integer, is_real  # noqa: F401 - also imported from here

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

# Sampler settings of the official checkpoints, for `PixNerdFlowMatchScheduler.from_official_preset`.
# fmt: off
OFFICIAL_SCHEDULER_PRESETS = {
    # Class-conditional XL/16 and L/16, as in configs_c2i/*.yaml (FID 1.93 for XL/16).
    "c2i-euler100": dict(shift=1.0, solver_order=1, num_inference_steps=100, guidance_scale=3.5,
                         guidance_interval_min=0.1, guidance_interval_max=1.0),
    # Class-conditional with the paper's Adams-2 sampler at half the steps (FID 2.16 for XL/16).
    "c2i-adams50": dict(shift=1.0, solver_order=2, num_inference_steps=50, guidance_scale=3.5,
                        guidance_interval_min=0.1, guidance_interval_max=1.0),
    # Text-to-image XXL/16, as in configs_t2i/inference_heavydecoder.yaml and app.py.
    "t2i": dict(shift=3.0, solver_order=2, num_inference_steps=25, guidance_scale=4.0,
                guidance_interval_min=0.0, guidance_interval_max=1.0),
}
# fmt: on


def check_sigmas(sigmas) -> torch.Tensor:
    """Custom unshifted `sigmas` (the N steps, without the final 0) as a float32 CPU tensor, or a ValueError naming
    them: a non-empty, strictly decreasing 1-D sequence of finite values in (0, 1]. The one check of custom sigmas;
    the pipelines call it before any work, `set_timesteps` on what it is given."""
    values = None
    if not isinstance(sigmas, (str, bytes)):
        try:
            values = torch.as_tensor(sigmas, dtype=torch.float32).cpu()
        except (TypeError, ValueError, RuntimeError):
            pass
    if (
        values is None
        or values.ndim != 1
        or values.numel() == 0
        or not torch.isfinite(values).all()
        or (values <= 0).any()
        or (values > 1).any()
        or (values.diff() >= 0).any()
    ):
        raise ValueError(
            "`sigmas` must be a non-empty, strictly decreasing 1-D sequence of finite values in (0, 1] (the N steps, "
            f"without the final 0), got {sigmas!r}."
        )
    return values


@dataclass
class PixNerdFlowMatchSchedulerOutput(BaseOutput):
    """
    Output class for the scheduler's `step` function.

    Args:
        prev_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The sample at the next (less noisy) sigma of the schedule; the input of the next model call.
        pred_original_sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The clean sample `x0 = sample - sigma * model_output` predicted from the current model output alone.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def adams_coefficients(nodes: List[float], start: float, end: float) -> List[float]:
    """Integrals over `[start, end]` of the Lagrange basis polynomials on `nodes` (oldest first), over their sum."""
    # In u = (x - start) / (end - start) the integral runs over [0, 1]; the basis is unchanged by an affine map, so
    # these are also the official coefficients computed in t = 1 - sigma (pre_integral.py, `lagrange_preint`).
    u = [(x - start) / (end - start) for x in nodes]
    integrals = []
    for j, u_j in enumerate(u):
        others = u[:j] + u[j + 1 :]
        basis = np.atleast_1d(np.poly(others)) / np.prod([u_j - u_m for u_m in others])
        integrals.append(float(np.polyval(np.polyint(basis), 1.0)))
    total = sum(integrals)
    return [c / total for c in integrals]


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The official time shift `t / (t + (1 - t) shift)` in sigma = 1 - t: `shift sigma / (1 + (shift - 1) sigma)`."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class PixNerdFlowMatchScheduler(SchedulerMixin, ConfigMixin):
    """
    The sampler of PixNerd ([Pixel Neural Field Diffusion](https://arxiv.org/abs/2507.23268)): an explicit
    Adams-Bashforth multistep solver (Euler for `solver_order=1`) of the flow-matching ODE on the paper's shifted
    grid, plus the interval that decides where classifier-free guidance applies.

    Sigmas follow diffusers (`sigma = 1` is noise, `0` is data; the model predicts `noise - x0`, as for
    [`FlowMatchEulerDiscreteScheduler`]). The guidance interval is given in the paper's time `t = 1 - sigma`
    (`0` is noise, `1` is data). `num_inference_steps` and `guidance_scale` are not used by the scheduler: they are the
    defaults a pipeline reads when the user passes `None`, so a saved pipeline samples with its checkpoint's settings.

    This model inherits from [`SchedulerMixin`] and [`ConfigMixin`]. Check the superclass documentation for the generic
    methods the library implements for all schedulers such as loading and saving.

    Args:
        num_train_timesteps (`int`, defaults to 1000):
            The scale of the timesteps given to the model: `timestep = sigma * num_train_timesteps`.
        shift (`float`, defaults to 1.0):
            The paper's time shift `t / (t + (1 - t) * shift)`, the same map as diffusers' sigma shift
            `shift * sigma / (1 + (shift - 1) * sigma)`. Values above 1 spend more steps near the noise.
        solver_order (`int`, defaults to 2):
            1 is Euler, 2 the paper's Adams-Bashforth-2 ("Adam2"). 3 and 4 are available, but the paper found them
            unstable in pixel space.
        guidance_interval_min (`float`, defaults to 0.0):
            Guidance applies only where `guidance_interval_min < t < guidance_interval_max`, strictly, so the default
            leaves the first step (t = 0) unguided, as the official samplers do.
        guidance_interval_max (`float`, defaults to 1.0):
            The upper end of the guidance interval, in t.
        num_inference_steps (`int`, defaults to 50):
            The default number of steps of `set_timesteps` and of the pipelines.
        guidance_scale (`float`, defaults to 3.5):
            The default classifier-free guidance scale of the pipelines.

    Examples:

    ```py
    >>> import torch
    >>> from diffusers_pixnerd.schedulers import PixNerdFlowMatchScheduler

    >>> scheduler = PixNerdFlowMatchScheduler.from_official_preset("c2i-adams50")
    >>> scheduler.set_timesteps()  # the preset's 50 steps
    >>> x0 = torch.zeros(2, 3, 8, 8)
    >>> sample = torch.randn(2, 3, 8, 8)
    >>> for t in scheduler.timesteps:
    ...     noise_pred = (sample - x0) / (t / 1000)  # a perfect model of `noise - x0`
    ...     # a pipeline mixes its unconditional and conditional predictions with this scale
    ...     guidance_scale = scheduler.config.guidance_scale if scheduler.is_guidance_active(t) else 1.0
    ...     sample = scheduler.step(noise_pred, t, sample).prev_sample
    >>> torch.allclose(sample, x0, atol=1e-5)
    True
    ```
    """

    _compatibles = []
    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        solver_order: int = 2,
        guidance_interval_min: float = 0.0,
        guidance_interval_max: float = 1.0,
        num_inference_steps: int = 50,
        guidance_scale: float = 3.5,
    ):
        if not is_integer(solver_order) or solver_order not in (1, 2, 3, 4):
            raise ValueError(f"`solver_order` must be the integer 1, 2, 3 or 4, got {solver_order!r}.")
        if not is_integer(num_train_timesteps) or num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be a positive integer, got {num_train_timesteps!r}.")
        if solver_order > 2:
            logger.warning(f"`solver_order={solver_order}`: the paper found orders above 2 unstable in pixel space.")
        if not is_real(shift) or not math.isfinite(shift) or not shift > 0:
            raise ValueError(f"`shift` must be a finite positive number, got {shift!r}.")
        if not is_integer(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"`num_inference_steps` must be a positive integer, got {num_inference_steps!r}.")
        if not is_real(guidance_scale) or not math.isfinite(guidance_scale):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}.")
        check_guidance_interval(
            guidance_interval_min, guidance_interval_max, "(guidance_interval_min, guidance_interval_max)"
        )

        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._times = None  # t = 1 - sigma as the official samplers hold it (float32), for the guidance interval
        self.model_outputs = []
        self._step_index = None
        self._begin_index = None

    @classmethod
    def from_official_preset(cls, name: str, **kwargs) -> "PixNerdFlowMatchScheduler":
        """
        Build the scheduler with the sampler settings of an official checkpoint.

        Args:
            name (`str`):
                `"c2i-euler100"` (class-conditional: Euler, 100 steps, CFG 3.5 on 0.1 < t < 1, shift 1),
                `"c2i-adams50"` (class-conditional: Adams-2, 50 steps, otherwise the same) or `"t2i"` (text-to-image:
                Adams-2, 25 steps, CFG 4 on 0 < t < 1, shift 3). See `OFFICIAL_SCHEDULER_PRESETS`.
            kwargs:
                Config values that override the preset's.
        """
        if name not in OFFICIAL_SCHEDULER_PRESETS:
            raise ValueError(f"`name` must be one of {sorted(OFFICIAL_SCHEDULER_PRESETS)}, got {name!r}.")
        return cls(**{**OFFICIAL_SCHEDULER_PRESETS[name], **kwargs})

    @property
    def step_index(self) -> Optional[int]:
        """The index of the next step; it increases by 1 after each `step`."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """The index of the first step, set by pipelines that start inside the schedule (image-to-image)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """
        Sets the index of the first step. Run it from the pipeline before the first `step`.

        Args:
            begin_index (`int`, defaults to `0`):
                The index in `timesteps` of the first step: within the schedule set by `set_timesteps`.
        """
        if not is_integer(begin_index) or begin_index < 0:
            raise ValueError(f"`begin_index` must be a non-negative integer, got {begin_index!r}.")
        if self.num_inference_steps is not None and begin_index >= self.num_inference_steps:
            raise ValueError(
                f"`begin_index` {begin_index!r} is past the end of the schedule: its {self.num_inference_steps} steps "
                f"have the indices 0 to {self.num_inference_steps - 1}."
            )
        self._begin_index = begin_index

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device] = None,
        sigmas: Optional[Union[List[float], np.ndarray, torch.Tensor]] = None,
    ):
        """
        Sets the sigmas of the sampling grid and resets the multistep history. Run it before sampling.

        Args:
            num_inference_steps (`int`, *optional*):
                The number of steps N. The grid is the official one: N uniform steps in t from 0 to 1 - 1/N, then 1,
                shifted with `shift`, i.e. sigmas `1, ..., 0` with N + 1 entries. Defaults to
                `config.num_inference_steps`.
            device (`str` or `torch.device`, *optional*):
                The device of `timesteps`; `sigmas` stay on the CPU.
            sigmas (`List[float]`, `np.ndarray` or `torch.Tensor`, *optional*):
                Custom unshifted sigmas of the N steps, strictly decreasing in (0, 1], without the final 0. `shift` is
                applied to them and 0 appended, as [`FlowMatchEulerDiscreteScheduler`] does, so
                `sigmas=np.linspace(1, 1 / N, N)` gives the default grid.
        """
        shift = self.config.shift
        if sigmas is None:
            n = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
            if not is_integer(n) or n < 1:
                raise ValueError(f"`num_inference_steps` must be a positive integer, got {n!r}.")
            # Built in t and in float32 as EulerSampler/AdamLMSampler do, so the interval test sees the same t values.
            times = torch.cat([torch.linspace(0.0, 1.0 - 1.0 / n, n), torch.ones(1)])
            times = times / (times + (1 - times) * shift)
            sigmas = 1.0 - times
        else:
            sigmas = check_sigmas(sigmas)
            n = sigmas.numel()
            if num_inference_steps is not None and num_inference_steps != n:
                raise ValueError(f"`num_inference_steps` ({num_inference_steps}) must equal `len(sigmas)` ({n}).")
            sigmas = shift_sigmas(sigmas, shift)
            sigmas = torch.cat([sigmas, torch.zeros(1)])
            times = 1.0 - sigmas

        self.num_inference_steps = n
        self.sigmas = sigmas  # (N + 1,), on the CPU to avoid a device sync per step
        self._times = times
        self.timesteps = (sigmas[:-1] * self.config.num_train_timesteps).to(device=device)
        self.model_outputs = []
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Union[float, torch.Tensor]) -> int:
        """The index of `timestep` in `timesteps`; a `ValueError` if it is not there."""
        if self.timesteps is None:
            raise ValueError("The schedule is not set: call `set_timesteps` first.")
        timestep = torch.as_tensor(timestep, device=self.timesteps.device)
        if timestep.numel() != 1:
            raise ValueError(f"`timestep` must be a single value, got shape {tuple(timestep.shape)}.")
        indices = (self.timesteps == timestep.reshape(())).nonzero()
        if len(indices) == 0:
            raise ValueError(
                f"`timestep` {timestep.item()} is not in the schedule; pass one of `scheduler.timesteps`."
            )
        return int(indices[0])

    def guidance_steps(self, guidance_interval: Optional[Tuple[float, float]] = None) -> List[bool]:
        """
        For each step of the schedule, whether classifier-free guidance applies: `min < t < max` with `t = 1 - sigma`,
        strictly. The interval is checked once, here, for the whole loop.

        Args:
            guidance_interval (`Tuple[float, float]`, *optional*):
                `(min, max)` in t overriding the config's, for a pipeline's per-call `guidance_interval`.
        """
        if self.timesteps is None:
            raise ValueError("The schedule is not set: call `set_timesteps` first.")
        if guidance_interval is None:
            guidance_interval = (self.config.guidance_interval_min, self.config.guidance_interval_max)
        low, high = guidance_interval
        check_guidance_interval(low, high, "guidance_interval")
        # Compared in float32, like the official `t_cur[0] > self.guidance_interval_min` (sampling.py): at t = 0 with
        # the default min 0 the first step stays unguided, and a grid point equal to the edge is left out.
        times = self._times[: self.num_inference_steps]
        return ((times > low) & (times < high)).tolist()

    def is_guidance_active(
        self,
        timestep: Optional[Union[float, torch.Tensor]] = None,
        guidance_interval: Optional[Tuple[float, float]] = None,
    ) -> bool:
        """
        Whether classifier-free guidance applies at one step (see `guidance_steps`, which answers for all of them).

        Args:
            timestep (`float` or `torch.Tensor`, *optional*):
                One of `timesteps`; defaults to the step that `step` will take next.
            guidance_interval (`Tuple[float, float]`, *optional*):
                `(min, max)` in t overriding the config's, for a pipeline's per-call `guidance_interval`.
        """
        if self.timesteps is None:
            raise ValueError("The schedule is not set: call `set_timesteps` first.")
        if timestep is None:
            index = self._step_index if self._step_index is not None else (self._begin_index or 0)
        else:
            index = self.index_for_timestep(timestep)
        return self.guidance_steps(guidance_interval)[index]

    def scale_model_input(
        self, sample: torch.Tensor, timestep: Optional[Union[float, torch.Tensor]] = None
    ) -> torch.Tensor:
        """Returns `sample` unchanged: the flow-matching model takes `x_sigma` as it is."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """
        The forward process `x_sigma = (1 - sigma) * x0 + sigma * noise`, `sigma = timesteps / num_train_timesteps`.

        Any timesteps in `[0, num_train_timesteps]` work (training), one per sample or one for all; no shift applied.
        """
        sigmas = torch.as_tensor(timesteps, dtype=torch.float32, device=original_samples.device)
        sigmas = (sigmas / self.config.num_train_timesteps).reshape(-1, *[1] * (original_samples.ndim - 1))
        noisy = (1.0 - sigmas) * original_samples.float() + sigmas * noise.float()
        return noisy.to(original_samples.dtype)

    def scale_noise(
        self, sample: torch.Tensor, timestep: Union[float, torch.Tensor], noise: torch.Tensor
    ) -> torch.Tensor:
        """`add_noise` with the argument order of [`FlowMatchEulerDiscreteScheduler.scale_noise`] (image-to-image)."""
        return self.add_noise(sample, noise, timestep)

    def _multistep_coefficients(self, step_index: int, order: int) -> List[float]:
        """The weights of the last `order` model outputs (oldest first) in the update from step `step_index`."""
        nodes = self.sigmas[step_index - order + 1 : step_index + 1].tolist()
        return adams_coefficients(nodes, self.sigmas[step_index].item(), self.sigmas[step_index + 1].item())

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Union[float, torch.Tensor],
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> Union[PixNerdFlowMatchSchedulerOutput, Tuple]:
        """
        Moves `sample` from the current sigma to the next with the Adams-Bashforth update of order
        `min(solver_order, number of steps taken + 1)`, computed in float32.

        Args:
            model_output (`torch.Tensor`):
                The (guided) model prediction `noise - x0` at `sample`.
            timestep (`float` or `torch.Tensor`):
                The current entry of `timesteps`; steps must follow `timesteps` in order.
            sample (`torch.Tensor`):
                The current sample `x_sigma`.
            return_dict (`bool`, defaults to `True`):
                Whether to return a [`PixNerdFlowMatchSchedulerOutput`] or a tuple.

        Returns:
            [`PixNerdFlowMatchSchedulerOutput`] or `tuple`:
                `prev_sample` and `pred_original_sample`, in the dtype of `sample`; a tuple of the two if `return_dict`
                is `False`.
        """
        if self.timesteps is None:
            raise ValueError("The schedule is not set: call `set_timesteps` before `step`.")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"`model_output` has shape {tuple(model_output.shape)} but `sample` {tuple(sample.shape)}: they must "
                "match."
            )
        if self._step_index is None:
            self._step_index = self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        index = self._step_index
        if index >= self.num_inference_steps:
            raise ValueError(f"All {self.num_inference_steps} steps are done; call `set_timesteps` to sample again.")
        if self.index_for_timestep(timestep) != index:
            raise ValueError(
                f"`timestep` {float(timestep)} is not the one of step {index} ({self.timesteps[index].item()}); "
                "the multistep history needs the steps of `scheduler.timesteps` in order."
            )

        # The order ramps up from Euler as in AdamLMSampler, and the last step is an ordinary Adams step too: the
        # official order annealing towards the end is commented out (adam_sampling.py).
        model_output = model_output.to(torch.float32)
        self.model_outputs = (self.model_outputs + [model_output])[-self.config.solver_order :]
        coefficients = self._multistep_coefficients(index, len(self.model_outputs))
        velocity = sum(c * v for c, v in zip(coefficients, self.model_outputs, strict=True))

        sigma, sigma_next = self.sigmas[index].item(), self.sigmas[index + 1].item()
        sample_fp32 = sample.to(torch.float32)
        prev_sample = sample_fp32 + (sigma_next - sigma) * velocity
        pred_original_sample = sample_fp32 - sigma * model_output
        self._step_index += 1

        prev_sample, pred_original_sample = prev_sample.to(sample.dtype), pred_original_sample.to(sample.dtype)
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return PixNerdFlowMatchSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
