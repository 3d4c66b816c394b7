"""Classifier-free guidance and the A14B boundary test, with the official semantics.

The official guide scale is a ``(low_noise, high_noise)`` tuple (diffusers orders its two scales the
other way round) and the boundary a ratio of the 1000 training timesteps: the high-noise expert
runs while ``t >= boundary·1000``. Which expert and which scale each step gets is decided once,
in :func:`wanx.sampling.plan.build_plan`.
"""

from __future__ import annotations


import torch

from ..configs import NUM_TRAIN_TIMESTEPS

def cfg(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``v_uncond + scale·(v_cond − v_uncond)``."""
    # parity: this operation order (not v_cond·s + v_uncond·(1 − s)), so rounding matches the official.
    return v_uncond + scale * (v_cond - v_uncond)


def _t_value(t) -> float:
    # parity: the official compares `t.item()` (an int64 timestep) with a float boundary.
    return t.item() if isinstance(t, torch.Tensor) else float(t)


def is_high_noise(t, boundary_ratio: float | None, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> bool:
    """True while ``t >= boundary_ratio·num_train_timesteps``; always False without a boundary."""
    if boundary_ratio is None:
        return False
    # parity: the boundary is the float product (0.875·1000 = 875.0, 0.9·1000 = 900.0), never rounded.
    return _t_value(t) >= boundary_ratio * num_train_timesteps
