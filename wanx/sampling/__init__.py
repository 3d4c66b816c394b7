"""Flow-matching schedules, samplers (UniPC, DPM++, Euler) and guidance helpers.

Typical loop::

    sampler = make_sampler("unipc", steps=40, shift=12.0)
    for t in sampler.timesteps:
        v = cfg(model(x, t, ctx), model(x, t, ctx_null), guide_scale_for(t, (3.0, 4.0), 0.875))
        x = sampler.step(v, x)
"""

from __future__ import annotations

from ..configs import NUM_TRAIN_TIMESTEPS
from .dpmpp import DPMPPSampler
from .euler import EulerSampler
from .guidance import cfg, expert_for_timestep, guide_scale_for, is_high_noise
from .schedules import Sampler, dpmpp_schedule, euler_schedule, shift_sigmas, unipc_schedule
from .unipc import UniPCSampler

SAMPLERS: dict[str, type[Sampler]] = {"unipc": UniPCSampler, "dpm++": DPMPPSampler, "euler": EulerSampler}


def make_sampler(name: str, steps: int, shift: float,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Sampler:
    """A fresh sampler ``"unipc"`` (official default), ``"dpm++"`` (official) or ``"euler"`` (diffusers)."""
    try:
        cls = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None
    return cls.from_schedule(steps, shift, num_train_timesteps)


__all__ = [
    "SAMPLERS", "DPMPPSampler", "EulerSampler", "Sampler", "UniPCSampler", "cfg", "dpmpp_schedule",
    "euler_schedule", "expert_for_timestep", "guide_scale_for", "is_high_noise", "make_sampler",
    "shift_sigmas", "unipc_schedule",
]
