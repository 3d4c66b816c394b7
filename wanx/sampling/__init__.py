"""Flow-matching schedules, samplers (UniPC, DPM++, Euler) and guidance helpers.

Typical loop (what ``wanx.pipelines.denoise.run_plan`` does)::

    plan = build_plan("unipc", steps=40, shift=12.0, guide_scale=(3.0, 4.0), boundary=0.875, num_experts=2)
    sampler = plan.make_sampler()
    for step in plan:
        model = experts[step.expert]
        v = cfg(model(x, step.timestep, ctx), model(x, step.timestep, ctx_null), step.guide_scale)
        x = sampler.step(v, x)
"""

from __future__ import annotations

from ..configs import NUM_TRAIN_TIMESTEPS
from .dpmpp import DPMPPSampler
from .euler import EulerSampler, FlowEulerSampler
from .guidance import cfg, is_high_noise
from .plan import PlanStep, SamplingPlan, build_plan
from .schedules import (Sampler, dpmpp_schedule, euler_schedule, explicit_schedule, flow_schedule, shift_sigmas,
                        unipc_schedule)
from .unipc import UniPCSampler

SAMPLERS: dict[str, type[Sampler]] = {"unipc": UniPCSampler, "dpm++": DPMPPSampler, "euler": EulerSampler,
                                       "flow_euler": FlowEulerSampler}
# Solvers that can walk any list of timesteps (the multistep ones assume their own schedule's spacing).
EXPLICIT_TIMESTEP_SOLVERS = ("euler", "flow_euler")


def make_sampler(name: str, steps: int, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
                 timesteps=None) -> Sampler:
    """A fresh sampler ``"unipc"`` (official default), ``"dpm++"`` (official), ``"euler"`` (diffusers) or
    ``"flow_euler"`` (the distilled 4-step schedule); ``timesteps`` replaces the schedule (Euler only)."""
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    if timesteps is not None:
        if name not in EXPLICIT_TIMESTEP_SOLVERS:
            raise ValueError(f"explicit timesteps need an Euler solver ({', '.join(EXPLICIT_TIMESTEP_SOLVERS)}), "
                             f"not {name}")
        return cls(*explicit_schedule(timesteps, num_train_timesteps))
    return cls.from_schedule(steps, shift, num_train_timesteps)


__all__ = [
    "SAMPLERS", "DPMPPSampler", "EulerSampler", "FlowEulerSampler", "explicit_schedule", "flow_schedule", "PlanStep", "Sampler", "SamplingPlan", "UniPCSampler",
    "build_plan", "cfg", "dpmpp_schedule", "euler_schedule", "is_high_noise", "make_sampler",
    "shift_sigmas", "unipc_schedule",
]
