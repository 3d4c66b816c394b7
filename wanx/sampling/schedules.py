"""Flow-matching noise schedules: the SD3 shift and the three official/diffusers step lists.

Every schedule returns ``(sigmas, timesteps)``: ``sigmas`` is a float32 tensor of ``steps + 1``
values ending in 0 (the sampler steps from ``sigmas[i]`` to ``sigmas[i + 1]``), ``timesteps`` the
``steps`` values the DiT receives. The three lists differ in small ways that change the numbers a
model sees, so each one reproduces its reference bit for bit (see the ``# parity:`` notes):

=========  ===========  ==========================  =========================================
solver     first sigma  timesteps                   reference
=========  ===========  ==========================  =========================================
unipc      shift(0.999) int64, truncated            official ``FlowUniPCMultistepScheduler``
dpm++      1.0          int64, truncated (1000 ..)  official ``get_sampling_sigmas`` + DPM++
euler      1.0          float32, ``sigma * 1000``   diffusers ``FlowMatchEulerDiscreteScheduler``
=========  ===========  ==========================  =========================================

The :class:`Sampler` base (the stateful step loop shared by the three solvers) lives here too.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

from ..configs import NUM_TRAIN_TIMESTEPS

T = TypeVar("T", float, np.ndarray, torch.Tensor)


def shift_sigmas(sigmas: T, shift: float) -> T:
    """SD3 timestep shift ``s·σ / (1 + (s−1)·σ)``; keeps 0 and 1 fixed, pushes the rest towards 1.

    Works on floats, numpy arrays and tensors, in their own precision (the references shift float64
    numpy arrays, diffusers' Euler also a float32 tensor, and the difference shows in the last bit).
    """
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _check(steps: int) -> None:
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _finish(sigmas: np.ndarray, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 sigmas -> (float32 sigmas + final 0, int64 timesteps), the way both official solvers do."""
    # parity: t = σ·1000 is computed in float64 and *truncated* to int64 (999.9 -> 999, never rounded).
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)
    # parity: the final sigma is exactly 0, so the last step lands on (and returns) the x0 estimate;
    # the table is then stored in float32 and every later scalar is computed from these float32 values.
    sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
    return sigmas, timesteps


def unipc_schedule(steps: int, shift: float,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The official UniPC list: ``FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift)``.

    ``linspace(σ_max, 0, steps+1)[:-1]`` shifted, with σ_max the first value of the 1000-entry training
    table, 1 − 1/1000 = 0.999: t2v (s=12, 40 steps) starts 999, 997, 995, ... .
    """
    _check(steps)
    # parity: σ_max = 0.999, not 1.0 (diffusers' UniPC starts at 1 − 1e-6 instead), and it is the float32
    # value 0.99900001287... because the official training table is a float32 tensor read back by .item().
    sigma_max = float(np.float32(1.0 - 1.0 / num_train_timesteps))
    sigmas = np.linspace(sigma_max, 0.0, steps + 1)[:-1]
    return _finish(shift_sigmas(sigmas, shift), num_train_timesteps)


def dpmpp_schedule(steps: int, shift: float,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The official DPM++ list: ``get_sampling_sigmas(steps, shift)`` given as ``sigmas=`` to a shift-1 scheduler.

    ``linspace(1, 0, steps+1)[:steps]`` shifted once; the first timestep is 1000 (σ = 1 exactly).
    """
    _check(steps)
    # parity: DPM++ starts at σ = 1.0 (UniPC at 0.999). The scheduler's own shift is 1, which is an exact
    # identity in float64, so the values are shifted once, not twice.
    sigmas = np.linspace(1.0, 0.0, steps + 1)[:steps]
    return _finish(shift_sigmas(sigmas, shift), num_train_timesteps)


def euler_schedule(steps: int, shift: float,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)`` list.

    There is no official Euler sampler; this is the list diffusers users know. Its timesteps are
    **float32** ``σ·1000`` (not truncated), and it starts at σ = 1 (t = 1000.0).
    """
    _check(steps)
    # parity: diffusers shifts its float32 training table once at construction and takes the endpoints
    # from it, then shifts the linspace between them again, so the last non-zero sigma is
    # shift(shift(1/1000)) and the first shift(shift(1)) = 1. The endpoint shift is float32 torch math.
    train_min = torch.tensor(1.0, dtype=torch.float32) / num_train_timesteps
    sigma_min = shift_sigmas(train_min, shift).item()
    sigma_max = 1.0  # shift(1) == 1 exactly, in float32 too
    t = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = torch.from_numpy(shift_sigmas(t / num_train_timesteps, shift)).to(torch.float32)
    timesteps = sigmas * num_train_timesteps  # float32, like diffusers
    return torch.cat([sigmas, sigmas.new_zeros(1)]), timesteps


def flow_schedule(steps: int, shift: float,
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The distilled (Wan2.2-Lightning / LightX2V) list: ``shift(linspace(1, 0, steps+1))``, float timesteps.

    4 steps at shift 5 give t = 1000, 937.5, 833.33, 625 and σ = 1, .9375, .8333, .625, 0: the
    timesteps the 4-step models were distilled on, never truncated to integers.
    """
    _check(steps)
    # parity: float32 throughout, as the Lightning scheduler (LightX2V's issue reports 937.5001).
    t = torch.linspace(float(num_train_timesteps), 0.0, steps + 1, dtype=torch.float32)
    sigmas = shift_sigmas(t / num_train_timesteps, shift)
    return sigmas, sigmas[:-1] * num_train_timesteps


def explicit_schedule(timesteps, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's own timesteps (what the DiT sees, no shift applied), strictly decreasing in (0, 1000]."""
    t = torch.as_tensor([float(v) for v in timesteps], dtype=torch.float32)
    if t.numel() < 1 or not torch.isfinite(t).all() or (t <= 0).any() or (t > num_train_timesteps).any():
        raise ValueError(f"timesteps must be finite values in (0, {num_train_timesteps}], got {list(timesteps)}")
    if (t[1:] >= t[:-1]).any():
        raise ValueError(f"timesteps must be strictly decreasing, got {list(timesteps)}")
    return torch.cat([t / num_train_timesteps, t.new_zeros(1)]), t


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log(α/σ), α = 1 − σ: +inf at σ = 0, −inf at σ = 1 (both solvers handle the infinities)."""
    # parity: a float32 0-dim tensor in, float32 out, as the official solvers compute every step scalar;
    # float64 scalars would move a 40-step result by ~1e-7 relative and lose bit-exactness.
    return torch.log(1 - sigma) - torch.log(sigma)


class Sampler:
    """A stateful walk down one schedule; call :meth:`step` once per entry of :attr:`timesteps`.

    ``step(v, x)`` takes the flow velocity ``v = ε − x0`` predicted at ``timesteps[i]`` for the
    sample ``x`` at ``sigmas[i]`` (any shape, e.g. ``[B, C, T, H, W]``) and returns the sample at
    ``sigmas[i + 1]``. The step scalars are float32 0-dim CPU tensors; they broadcast onto a sample
    on any device without a host sync.
    """

    name = "base"

    def __init__(self, sigmas, timesteps: torch.Tensor):
        sigmas = torch.as_tensor(sigmas).to("cpu", torch.float32)
        if sigmas.ndim != 1 or len(sigmas) != len(timesteps) + 1 or len(timesteps) < 1:
            raise ValueError(f"need steps+1 sigmas for steps timesteps, got {tuple(sigmas.shape)} "
                             f"and {tuple(timesteps.shape)}")
        self.sigmas = sigmas
        self.timesteps = timesteps
        self.reset()

    def __len__(self) -> int:
        return len(self.timesteps)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, t0={self.timesteps[0].item()})"

    @property
    def step_index(self) -> int:
        """How many steps have been taken since construction or the last :meth:`reset`."""
        return self._index

    def reset(self) -> None:
        """Forget the history so the same schedule can be walked again."""
        self._index = 0
        self._reset_state()

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """One solver step from ``sigmas[i]`` to ``sigmas[i+1]``; returns the new sample."""
        if self._index >= len(self):
            raise RuntimeError(f"all {len(self)} steps are done; call reset() to sample again")
        if model_output.shape != sample.shape:
            raise ValueError(f"model_output {tuple(model_output.shape)} != sample {tuple(sample.shape)}")
        out = self._update(model_output, sample, self._index)
        self._index += 1
        return out

    def _reset_state(self) -> None:
        pass

    def _update(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        raise NotImplementedError
