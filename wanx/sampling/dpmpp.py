"""DPM-Solver++(2M), midpoint, for flow matching: the official ``--sample_solver dpm++``.

Reproduces the official ``FlowDPMSolverMultistepScheduler`` as Wan drives it
(``algorithm_type="dpmsolver++", solver_type="midpoint", solver_order=2, lower_order_final=True,
euler_at_final=False, final_sigmas_type="zero"``) on the :func:`dpmpp_schedule` sigmas. With
α = 1 − σ, λ = log(α/σ), h = λ_{i+1} − λ_i and x0 = x − σ_i·v:

* first order (first and last step): ``x' = (σ_{i+1}/σ_i)·x − α_{i+1}(e^{−h} − 1)·x0``;
* second order: the same with x0 replaced by ``x0 + ½·(x0 − x0_prev)/r``, r = (λ_i − λ_{i−1})/h.

The schedule starts at σ = 1, so λ_0 = −inf: the first step is an Euler step and the second one's
correction term is 0·(x0 − x0_prev); IEEE infinities give exactly that, as in the official code.
"""

from __future__ import annotations

import torch

from ..configs import NUM_TRAIN_TIMESTEPS
from .schedules import Sampler, dpmpp_schedule, log_snr


class DPMPPSampler(Sampler):
    """Multistep DPM-Solver++ of order 2 (midpoint); see the module docstring."""

    name = "dpm++"
    order = 2

    @classmethod
    def from_schedule(cls, steps: int, shift: float,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "DPMPPSampler":
        """The official schedule (σ from 1.0, int64 timesteps from 1000), see :func:`dpmpp_schedule`."""
        return cls(*dpmpp_schedule(steps, shift, num_train_timesteps))

    def _reset_state(self) -> None:
        self._x0: list[torch.Tensor] = []  # the last two x0 estimates, newest last
        self._warmup = 0

    def _update(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        x0 = x - self.sigmas[i] * v  # promoted dtype of (x, v)
        self._x0 = (self._x0 + [x0])[-self.order:]
        sig_s, sig_t = self.sigmas[i], self.sigmas[i + 1]
        lam_s = log_snr(sig_s)
        h = log_snr(sig_t) - lam_s
        # parity: the official writes exp(−h) − 1, not expm1(−h); the two differ in float32.
        coef = (1 - sig_t) * (torch.exp(-h) - 1.0)
        # parity: the sample (not x0) is upcast to float32 for the update, the result is cast to x0's dtype.
        x32 = x.to(torch.float32)
        # parity: final_sigmas_type="zero" makes the last step first order (lower_order_final), so it
        # returns x0 exactly; warm-up makes the first one first order.
        if self._warmup < 1 or i == len(self) - 1:
            out = sig_t / sig_s * x32 - coef * x0
        else:
            r = (lam_s - log_snr(self.sigmas[i - 1])) / h
            d1 = (1.0 / r) * (x0 - self._x0[-2])
            out = sig_t / sig_s * x32 - coef * x0 - 0.5 * coef * d1
        self._warmup = min(self._warmup + 1, self.order)
        return out.to(x0.dtype)
