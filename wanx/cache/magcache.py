"""MagCache for Wan 2.2: skip the transformer blocks on steps where their residual barely changes.

The block stack's residual ``r = blocks(x) - x`` shrinks slowly and smoothly from step to step;
how much is measured once (the magnitude ratios, see :mod:`wanx.cache.ratios`). While the
accumulated drift ``sum |1 - prod(ratios since the last computed step)|`` stays under the threshold,
and for at most ``max_skips`` steps in a row, a step reuses the last residual (``x + r``) instead of
running the blocks; embeddings and the output head always run. Each branch (conditional,
unconditional) keeps its own residual and drift, indexed by plan step, and one state spans both
experts of a generation, as in the reference implementation (Zehong-Ma/MagCache). When both
branches share one batched call and only one of them may skip, the blocks run for the batch and
both residuals are refreshed (so batched and unbatched CFG can differ on such steps, which the
near-equal cond/uncond ratios make rare). A computed step always resets its branch's drift.

Retention (never skipped, so the cache restarts from a fresh residual), with ``R = retention``:
``"t2v"``: the first R of each expert's steps; ``"i2v"``: every high-noise step and the first R of
the low-noise ones; ``"ti2v"``: the first R of all steps. "The first R of n steps" is
``ceil(R * n)`` steps.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError
from ..sampling.plan import SamplingPlan
from .ratios import RatioTable
from .session import BlockRunner, StepCache, StepRun, switch_step

log = logging.getLogger("wanx")

RETENTION_RULES = ("t2v", "i2v", "ti2v")
DEFAULT_THRESHOLD, DEFAULT_MAX_SKIPS, DEFAULT_RETENTION = 0.06, 2, 0.2


def protected_steps(rule: str, num_steps: int, switch: int, retention: float) -> frozenset[int]:
    """The steps that always run the blocks, for a plan whose low-noise expert starts at ``switch``."""
    def head(start: int, length: int) -> range:
        # The epsilon keeps 0.2 * 25 = 5.000000000000001 from protecting a sixth step.
        return range(start, start + min(length, math.ceil(retention * length - 1e-9)))

    if rule == "ti2v":
        return frozenset(head(0, num_steps))
    if rule == "t2v":
        return frozenset(head(0, switch)) | frozenset(head(switch, num_steps - switch))
    if rule == "i2v":
        return frozenset(range(switch)) | frozenset(head(switch, num_steps - switch))
    raise ValueError(f"unknown retention rule {rule!r}; choose from {', '.join(RETENTION_RULES)}")


@dataclass
class _Branch:
    """One branch's cache: the last computed residual and the drift accumulated since."""

    ratio: float = 1.0  # product of the step ratios since the residual was computed
    error: float = 0.0  # sum of |1 - ratio| over those steps
    skips: int = 0  # steps reused in a row
    residual: torch.Tensor | None = None  # [1, L, dim], fp32
    last_step: int | None = None  # the plan step this branch last ran


class MagCache(StepCache):
    """MagCache settings and ratio table; reusable across generations (each gets a fresh state)."""

    kind = "magcache"

    def __init__(self, ratios: RatioTable, *, threshold: float = DEFAULT_THRESHOLD,
                 max_skips: int = DEFAULT_MAX_SKIPS, retention: float = DEFAULT_RETENTION,
                 retention_rule: str = "t2v"):
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
            raise InputError("cache", f"{{arg}}: the MagCache threshold must be a number >= 0, got {threshold!r}")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 0:
            raise InputError("cache", f"{{arg}}: K (max consecutive skips) must be a whole number >= 0, "
                                      f"got {max_skips!r}")
        if not (isinstance(retention, (int, float)) and 0 <= retention <= 1):
            raise InputError("cache", f"{{arg}}: R (retention ratio) must be in [0, 1], got {retention!r}")
        if retention_rule not in RETENTION_RULES:
            raise InputError("cache", f"{{arg}}: retention rule must be one of {', '.join(RETENTION_RULES)}, "
                                      f"got {retention_rule!r}")
        self.ratios, self.threshold, self.max_skips = ratios, float(threshold), max_skips
        self.retention, self.retention_rule = float(retention), retention_rule

    def start(self, plan: SamplingPlan) -> "MagCacheRun":
        measured = self.ratios.settings
        if measured.get("solver", plan.solver) != plan.solver or measured.get("shift", plan.shift) != plan.shift:
            log.info("MagCache ratios %s were measured with %s shift %s; this run uses %s shift %s",
                     self.ratios.source, measured.get("solver"), measured.get("shift"), plan.solver, plan.shift)
        return MagCacheRun(self, plan)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold, "max_skips": self.max_skips,
                "retention": self.retention, "retention_rule": self.retention_rule, "ratios": self.ratios.source}


class MagCacheRun(StepRun):
    """One generation under MagCache (the block runner and its per-branch state)."""

    kind = "magcache"

    def __init__(self, cache: MagCache, plan: SamplingPlan):
        super().__init__(plan)
        self.cache = cache
        switch = switch_step(plan)
        self.step_ratios = cache.ratios.for_plan(len(plan), switch)  # [branch][step]
        self.protected = protected_steps(cache.retention_rule, len(plan), switch, cache.retention)
        self.branches: dict[int, _Branch] = {}

    def _proposal(self, branch: int, x: torch.Tensor) -> tuple[float, float, int] | None:
        """The branch's drift if this step reused its residual, or None when it must compute."""
        step = self.step.index
        state = self.branches.setdefault(branch, _Branch())
        if (step in self.protected or branch >= len(self.step_ratios) or state.last_step != step - 1
                or state.residual is None or state.residual.shape != x.shape or state.residual.device != x.device):
            # Protected, unknown branch, a gap since its last run (e.g. no uncond pass then),
            # no residual yet, or one of another latent grid: compute.
            return None
        ratio = state.ratio * self.step_ratios[branch][step]
        error = state.error + abs(1.0 - ratio)
        skips = state.skips + 1
        if error < self.cache.threshold and skips <= self.cache.max_skips:
            return ratio, error, skips
        return None

    def run(self, inner: BlockRunner, blocks, x, e0, context, rope, ctx_bias) -> torch.Tensor:
        branches = self.take_branches(x.shape[0])
        proposals = [self._proposal(b, x[i:i + 1]) for i, b in enumerate(branches)]
        skip = all(p is not None for p in proposals)
        if skip:
            residual = torch.cat([self.branches[b].residual for b in branches])  # [B, L, dim]
            out = x + residual
            for b, (ratio, error, skips) in zip(branches, proposals):
                state = self.branches[b]
                state.ratio, state.error, state.skips = ratio, error, skips
        else:
            # A batched call whose branches disagree runs the blocks for the whole batch and
            # refreshes both residuals (no slicing of every input to run one branch); the cond and
            # uncond ratios are nearly equal, so the branches rarely disagree.
            out = inner(blocks, x, e0, context, rope, ctx_bias)
            residual = out - x  # [B, L, dim] fp32
            for i, b in enumerate(branches):
                state = self.branches[b]
                state.ratio, state.error, state.skips = 1.0, 0.0, 0
                state.residual = residual[i:i + 1]
        for b in branches:
            self.branches[b].last_step = self.step.index
        self.record(branches, skip, 0 if skip else len(blocks))
        return out
