"""First-order Euler for flow matching: ``x_{i+1} = x_i + (σ_{i+1} − σ_i)·v``.

Not an official Wan solver; it follows diffusers' ``FlowMatchEulerDiscreteScheduler`` (the type hint
of diffusers' Wan pipelines) on the :func:`euler_schedule` sigmas, whose timesteps are float32.
"""

from __future__ import annotations

import torch

from ..configs import NUM_TRAIN_TIMESTEPS
from .schedules import Sampler, euler_schedule, flow_schedule


class EulerSampler(Sampler):
    """Deterministic Euler steps along the velocity; stateless apart from the step counter."""

    name = "euler"

    @classmethod
    def from_schedule(cls, steps: int, shift: float,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "EulerSampler":
        """diffusers' schedule (σ from 1.0, float32 timesteps), see :func:`euler_schedule`."""
        return cls(*euler_schedule(steps, shift, num_train_timesteps))

    def _update(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        dt = self.sigmas[i + 1] - self.sigmas[i]  # float32, negative
        # parity: diffusers upcasts the sample to float32 for the update. It then casts the result to
        # v's dtype; we cast to the promoted dtype of (x, v) instead, so a bf16 velocity never rounds
        # float32 latents (identical whenever v is at least as wide as x, e.g. wanx's float32 v).
        out = x.to(torch.float32) + dt * v
        return out.to(torch.promote_types(x.dtype, v.dtype))


class FlowEulerSampler(EulerSampler):
    """The same Euler steps on the distilled schedule (:func:`flow_schedule`): 4-step Lightning/LightX2V."""

    name = "flow_euler"

    @classmethod
    def from_schedule(cls, steps: int, shift: float,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "FlowEulerSampler":
        return cls(*flow_schedule(steps, shift, num_train_timesteps))
