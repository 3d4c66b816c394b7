"""Classifier-free guidance and the A14B two-expert switch, with the official semantics.

The official guide scale is a ``(low_noise, high_noise)`` tuple (diffusers orders its two scales the
other way round) and the boundary a ratio of the 1000 training timesteps: the high-noise expert
runs while ``t >= boundary·1000``.
"""

from __future__ import annotations

from typing import Literal, Sequence, Union

import torch

from ..configs import NUM_TRAIN_TIMESTEPS

GuideScale = Union[float, Sequence[float]]


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


def expert_for_timestep(t, boundary_ratio: float,
                        num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Literal["high", "low"]:
    """Which A14B expert denoises at timestep ``t``: ``"high"`` while t ≥ boundary·1000, else ``"low"``."""
    return "high" if is_high_noise(t, boundary_ratio, num_train_timesteps) else "low"


def guide_scale_for(t, guide_scale: GuideScale, boundary_ratio: float | None,
                    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> float:
    """The CFG scale at ``t``: a float as is, or the official ``(low, high)`` pair picked by the boundary."""
    if isinstance(guide_scale, (int, float)):
        return float(guide_scale)
    low, high = guide_scale
    if boundary_ratio is None:
        if low != high:
            raise ValueError(f"a (low, high) guide scale {tuple(guide_scale)} needs a boundary")
        return float(low)
    return float(high if is_high_noise(t, boundary_ratio, num_train_timesteps) else low)
