"""UniPC (bh2, order 2, data prediction) for flow matching: the official default solver.

Reproduces the official ``FlowUniPCMultistepScheduler`` with the settings Wan uses
(``solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
final_sigmas_type="zero", disable_corrector=[]``). With α = 1 − σ and λ = log(α/σ), one step i:

1. ``x0 = x − σ_i·v`` (the model's clean-sample estimate at the *uncorrected* sample);
2. for i > 0, UniC corrects x with the new x0, at the order the previous predictor used;
3. UniP predicts x at σ_{i+1} from the last one or two x0 (order 1 on the first and last step).

The official step runs under bf16 autocast. Its ``einsum`` over past x0 differences only contracts a
size-1 axis at order 2, which torch lowers to a plain product that autocast leaves in float32 (seen
under CPU autocast; a size-2 axis would go through bmm in bf16), so plain products here match it.
"""

from __future__ import annotations

import torch

from ..configs import NUM_TRAIN_TIMESTEPS
from .schedules import Sampler, log_snr, unipc_schedule


class UniPCSampler(Sampler):
    """Multistep UniPC-bh2 predictor-corrector of order 2; see the module docstring."""

    name = "unipc"
    order = 2

    @classmethod
    def from_schedule(cls, steps: int, shift: float,
                      num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "UniPCSampler":
        """The official schedule (σ from shift(0.999), int64 timesteps), see :func:`unipc_schedule`."""
        return cls(*unipc_schedule(steps, shift, num_train_timesteps))

    def _reset_state(self) -> None:
        self._x0: list[torch.Tensor] = []  # the last `order` x0 estimates, newest last
        self._last_sample: torch.Tensor | None = None  # the (corrected) start of the last predictor
        self._last_order = 0
        self._warmup = 0  # how many x0 the history holds, capped at `order`

    def _update(self, v: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
        # parity: no upcast; x0 is in the promoted dtype of (x, v), as in the official scheduler.
        x0 = x - self.sigmas[i] * v
        if i > 0:
            # parity: the corrector runs on every step but the first (disable_corrector=[]), and it only
            # changes the sample carried forward: x0 above was taken from the uncorrected sample.
            x = self._correct(x0, i)
        self._x0 = (self._x0 + [x0])[-self.order:]
        # parity: lower_order_final -> order 1 on the last step (always, not only below 15 steps);
        # warm-up -> order 1 while the history holds one x0.
        order = min(self.order, len(self) - i, self._warmup + 1)
        self._last_sample, self._last_order = x, order
        self._warmup = min(self._warmup + 1, self.order)
        return self._predict(x, i, order)

    def _predict(self, x: torch.Tensor, i: int, order: int) -> torch.Tensor:
        """UniP-bh2 from σ_i to σ_{i+1}; with σ_{i+1} = 0 it is exactly x0 (h = inf, expm1(−h) = −1)."""
        sig_s, sig_t = self.sigmas[i], self.sigmas[i + 1]
        alpha_t = 1 - sig_t
        lam_s = log_snr(sig_s)
        h = log_snr(sig_t) - lam_s
        phi_1 = torch.expm1(-h)  # data prediction integrates with −h
        b_h = torch.expm1(-h)  # bh2's B(h); equal to phi_1 but named as the paper does
        m0 = self._x0[-1]
        x_t = sig_t / sig_s * x - alpha_t * phi_1 * m0
        if order == 2:
            r = (log_snr(self.sigmas[i - 1]) - lam_s) / h
            d1 = (self._x0[-2] - m0) / r
            # parity: order-2 UniP uses the fixed ρ = 1/2, not a solved one.
            x_t = x_t - alpha_t * b_h * (0.5 * d1)
        # parity: cast back to the incoming sample dtype (the official `.to(x.dtype)`).
        return x_t.to(x.dtype)

    def _correct(self, x0: torch.Tensor, i: int) -> torch.Tensor:
        """UniC-bh2: redo the step σ_{i−1} → σ_i from the stored sample, using the fresh x0 at σ_i too."""
        order = self._last_order
        x = self._last_sample
        sig_s, sig_t = self.sigmas[i - 1], self.sigmas[i]
        alpha_t = 1 - sig_t
        lam_s = log_snr(sig_s)
        h = log_snr(sig_t) - lam_s
        hh = -h
        phi_1 = torch.expm1(hh)
        b_h = torch.expm1(hh)
        m0 = self._x0[-1]
        base = sig_t / sig_s * x - alpha_t * phi_1 * m0
        d1_t = x0 - m0
        if order == 1:
            # parity: order-1 UniC also uses the fixed ρ = 1/2.
            x_t = base - alpha_t * b_h * (0.5 * d1_t)
        else:
            r = (log_snr(self.sigmas[i - 2]) - lam_s) / h
            d1 = (self._x0[-2] - m0) / r
            # ρ solves [[1, 1], [r, 1]]·ρ = b, b = (φ_2, 2·φ_3)/B(h), φ_{k+1} = φ_k/hh − 1/k!
            phi_2 = phi_1 / hh - 1
            phi_3 = phi_2 / hh - 0.5
            b = torch.stack([phi_2 / b_h, phi_3 * 2 / b_h])
            lhs = torch.tensor([[1.0, 1.0], [r.item(), 1.0]], dtype=b.dtype)
            # parity: b (its φ terms lose digits to cancellation) and the solve stay float32, and ρ
            # is then rounded to the sample dtype, as in the official scheduler.
            rho = torch.linalg.solve(lhs, b).to(x.dtype)
            x_t = base - alpha_t * b_h * (rho[0] * d1 + rho[1] * d1_t)
        return x_t.to(x.dtype)
