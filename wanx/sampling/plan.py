"""The sampling plan: every denoising step decided before the loop runs.

Each :class:`PlanStep` says which timestep the DiT sees, at which noise level, which expert runs
and with which guidance scale, and whether the unconditional pass is needed. The loop only
executes the plan; the expert switch and the guidance pick live here and nowhere else, so step
caching, distilled few-step recipes and multi-GPU placement can read or rewrite a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..configs import NUM_TRAIN_TIMESTEPS
from .guidance import is_high_noise
from .schedules import Sampler

HIGH_NOISE, LOW_NOISE = 0, 1  # expert indices, in the pipeline's (high_noise, low_noise) order


@dataclass(frozen=True)
class PlanStep:
    """One denoising step."""

    index: int
    timestep: torch.Tensor  # 0-dim, the solver's own dtype (int64 official, float32 Euler)
    sigma: float  # noise level the step starts from
    sigma_next: float  # noise level it ends at
    expert: int  # HIGH_NOISE or LOW_NOISE (always HIGH_NOISE for a one-expert model)
    guide_scale: float
    loras: bool = True  # whether live LoRAs act on this step (off in a real-guidance phase)

    @property
    def uncond(self) -> bool:
        """Whether the unconditional pass runs: guidance 1 is a no-op, so it is skipped."""
        return self.guide_scale != 1.0

    def describe(self) -> dict:
        """Plain values, for callbacks, logs and the server's progress reports."""
        return {"index": self.index, "timestep": self.timestep.item(), "sigma": self.sigma,
                "expert": "high" if self.expert == HIGH_NOISE else "low", "guide_scale": self.guide_scale,
                "uncond": self.uncond, "loras": self.loras}


@dataclass(frozen=True)
class SamplingPlan:
    """The steps of one generation, and how to make the solver that walks them."""

    solver: str
    shift: float
    steps: tuple[PlanStep, ...]
    timesteps: tuple[float, ...] | None = None  # an explicit schedule replacing the solver's own

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[PlanStep]:
        return iter(self.steps)

    def make_sampler(self) -> Sampler:
        """A fresh solver over this plan's schedule."""
        from . import make_sampler

        return make_sampler(self.solver, len(self.steps), self.shift, timesteps=self.timesteps)

    @property
    def experts_used(self) -> tuple[int, ...]:
        return tuple(sorted({s.expert for s in self.steps}))


def build_plan(solver: str, steps: int, shift: float, guide_scale: tuple[float, float],
               boundary: float | None, num_experts: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, *,
               timesteps=None, boundary_step: int | None = None, cfg_first_steps: int = 0,
               cfg_first_scale: tuple[float, float] | None = None) -> SamplingPlan:
    """The official two-expert recipe: the high-noise expert and ``guide_scale[1]`` while
    ``t >= boundary * 1000``, then the low-noise expert and ``guide_scale[0]``.

    ``guide_scale`` is the official ``(low_noise, high_noise)`` pair; ``boundary`` None means one
    expert and the low-noise scale throughout. ``boundary_step`` switches by step index instead
    (LightX2V's ``boundary_step_index``). ``timesteps`` replaces the solver's schedule. The first
    ``cfg_first_steps`` steps use ``cfg_first_scale`` with live LoRAs off: the real-guidance phase
    that counters the slow motion of distilled 4-step sampling.
    """
    from . import make_sampler

    sampler = make_sampler(solver, steps, shift, num_train_timesteps, timesteps=timesteps)
    plan = []
    for i, t in enumerate(sampler.timesteps):
        if boundary_step is not None:
            high_noise = i < boundary_step
        else:
            high_noise = is_high_noise(t, boundary, num_train_timesteps)
        expert = HIGH_NOISE if num_experts == 1 or (boundary is None and boundary_step is None) or high_noise \
            else LOW_NOISE
        phase = i < cfg_first_steps
        low, high = cfg_first_scale if phase and cfg_first_scale is not None else guide_scale
        # parity: the official picks the high-noise scale iff t >= boundary, whatever the expert count.
        plan.append(PlanStep(index=i, timestep=t, sigma=sampler.sigmas[i].item(),
                             sigma_next=sampler.sigmas[i + 1].item(), expert=expert,
                             guide_scale=float(high if high_noise else low), loras=not phase))
    fixed = None if timesteps is None else tuple(float(v) for v in sampler.timesteps)
    return SamplingPlan(solver=solver, shift=shift, steps=tuple(plan), timesteps=fixed)
