"""Canonical LoRA entries: what one file asks to change in one official-named parameter.

Every format wanx reads is normalised into these four shapes. Each knows the shape of the dense
delta it produces (checked against the model before anything is applied) and computes that delta
in float32 (the caller multiplies by the user's strength and casts back to the weight dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


def _f32(t: torch.Tensor, device: torch.device | str | None) -> torch.Tensor:
    return t.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class LowRank:
    """``delta = scale * up @ down`` for ``module.weight`` (down ``[r, in, *k]``, up ``[out, r, *1]``)."""

    module: str
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    alpha: float | None = None  # as stored in the file (None: absent), for reports
    kind = "lora"

    @property
    def param(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta_shape(self) -> Shape:
        return (self.up.shape[0], *self.down.shape[1:])

    def delta(self, device=None) -> torch.Tensor:
        # Conv kernels (patch_embedding) flatten to a matrix product and fold back.
        prod = _f32(self.up, device).flatten(1) @ _f32(self.down, device).flatten(1)  # [out, in*k]
        return prod.mul_(self.scale).view(self.delta_shape())


@dataclass(frozen=True)
class LoHa:
    """LyCORIS LoHa: ``delta = scale * (w1a @ w1b) * (w2a @ w2b)`` (Hadamard product), Linear only."""

    module: str
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    scale: float
    alpha: float | None = None
    kind = "loha"

    @property
    def param(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def delta_shape(self) -> Shape:
        return (self.w1a.shape[0], self.w1b.shape[1])

    def delta(self, device=None) -> torch.Tensor:
        left = _f32(self.w1a, device) @ _f32(self.w1b, device)
        right = _f32(self.w2a, device) @ _f32(self.w2b, device)
        return left.mul_(right).mul_(self.scale)


@dataclass(frozen=True)
class LoKr:
    """LyCORIS LoKr: ``delta = scale * kron(W1, W2)``, each factor full or ``a @ b``, Linear only."""

    module: str
    w1: torch.Tensor | None
    w1a: torch.Tensor | None
    w1b: torch.Tensor | None
    w2: torch.Tensor | None
    w2a: torch.Tensor | None
    w2b: torch.Tensor | None
    scale: float
    alpha: float | None = None
    kind = "lokr"

    @property
    def param(self) -> str:
        return f"{self.module}.weight"

    @property
    def rank(self) -> int | None:
        """The decomposition rank, or None when both factors are stored whole."""
        b = self.w2b if self.w2b is not None else self.w1b
        return None if b is None else b.shape[0]

    def _factor_shape(self, whole, a, b) -> Shape:
        return tuple(whole.shape) if whole is not None else (a.shape[0], b.shape[1])

    def delta_shape(self) -> Shape:
        r1, c1 = self._factor_shape(self.w1, self.w1a, self.w1b)
        r2, c2 = self._factor_shape(self.w2, self.w2a, self.w2b)
        return (r1 * r2, c1 * c2)

    def delta(self, device=None) -> torch.Tensor:
        def factor(whole, a, b):
            return _f32(whole, device) if whole is not None else _f32(a, device) @ _f32(b, device)
        w1 = factor(self.w1, self.w1a, self.w1b)
        w2 = factor(self.w2, self.w2a, self.w2b)
        return torch.kron(w1, w2).mul_(self.scale)


@dataclass(frozen=True)
class FullDelta:
    """A whole-tensor difference added to one parameter (LightX2V ``.diff``/``.diff_b``/``.diff_m``,
    diffusers ``lora_B.bias``); ``scale`` is 1 except for PEFT biases, which PEFT scales like the pair."""

    module: str
    param: str
    tensor: torch.Tensor
    scale: float = 1.0
    kind = "diff"

    @property
    def rank(self) -> None:
        return None

    def delta_shape(self) -> Shape:
        return tuple(self.tensor.shape)

    def delta(self, device=None) -> torch.Tensor:
        out = _f32(self.tensor, device)
        return out * self.scale if self.scale != 1.0 else out.clone()


Entry = LowRank | LoHa | LoKr | FullDelta
