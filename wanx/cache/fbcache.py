"""First-block cache: run the first block, and skip the others while its residual barely moves.

No calibration: the first block always runs, and when its residual is within ``threshold``
(mean absolute difference relative to the mean magnitude) of the one seen the last time the
whole stack ran for that branch, the remaining blocks are replaced by their cached residual
(the approach of diffusers' ``FirstBlockCache``). It costs one block per step, so it saves less
than MagCache on shallow models; it needs no ratio table, so it works on any checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..sampling.plan import SamplingPlan
from .session import BlockRunner, StepCache, StepRun

DEFAULT_FB_THRESHOLD = 0.05


@dataclass
class _Branch:
    head: torch.Tensor | None = None  # first block's residual when the stack last ran, [1, L, dim]
    tail: torch.Tensor | None = None  # the other blocks' residual then, [1, L, dim]
    last_step: int | None = None


class FirstBlockCache(StepCache):
    """Calibration-free step cache keyed on the first block's residual."""

    kind = "fbcache"

    def __init__(self, threshold: float = DEFAULT_FB_THRESHOLD):
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
            raise InputError("cache", f"{{arg}}: the first-block cache threshold must be a number >= 0, "
                                      f"got {threshold!r}")
        self.threshold = float(threshold)

    def start(self, plan: SamplingPlan) -> "FirstBlockCacheRun":
        return FirstBlockCacheRun(self.threshold, plan)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold}


class FirstBlockCacheRun(StepRun):
    kind = "fbcache"

    def __init__(self, threshold: float, plan: SamplingPlan):
        super().__init__(plan)
        self.threshold = threshold
        self.branches: dict[int, _Branch] = {}

    def _reusable(self, branch: int, head: torch.Tensor) -> bool:
        state = self.branches.setdefault(branch, _Branch())
        if state.head is None or state.last_step != self.step.index - 1 or state.head.shape != head.shape:
            return False
        change = (head - state.head).abs().mean() / state.head.abs().mean().clamp_min(1e-12)
        return change.item() < self.threshold

    def run(self, inner: BlockRunner, blocks, x, e0, context, rope, ctx_bias) -> torch.Tensor:
        branches = self.take_branches(x.shape[0])
        first = blocks[0](x, e0, context, rope, ctx_bias)  # [B, L, dim] fp32
        head = first - x
        skip = all([self._reusable(b, head[i:i + 1]) for i, b in enumerate(branches)])
        if skip:
            out = first + torch.cat([self.branches[b].tail for b in branches])
        else:
            out = inner(blocks[1:], first, e0, context, rope, ctx_bias)
            tail = out - first
            for i, b in enumerate(branches):
                self.branches[b].head, self.branches[b].tail = head[i:i + 1], tail[i:i + 1]
        for b in branches:
            self.branches[b].last_step = self.step.index
        self.record(branches, skip, 1 if skip else len(blocks))
        return out
