"""What every step cache shares: one run's bookkeeping and the runner it puts on the experts.

A step cache is applied from outside (design.md §4.8): for one generation it becomes the
``block_runner`` of every expert (:meth:`StepCache.attach`), and the previous runners come back
when the run ends (:meth:`StepRun.detach`, which ``run_plan`` calls in a ``finally``: also when the
run fails or is cancelled). The loop tells it which plan step runs (:meth:`StepRun.begin_step`);
each block-stack call then takes the next branches of that step in order, conditional first, so
the same bookkeeping serves guidance 1 (one branch), batched CFG (one call, B=2) and CFG run as
two calls of B=1 (unbatched, or a CPU batch split sample by sample inside the DiT).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch

from ..model.dit import run_blocks
from ..sampling.plan import LOW_NOISE, PlanStep, SamplingPlan

COND, UNCOND = 0, 1  # branch indices, in the order the loop evaluates them

BlockRunner = Callable[..., torch.Tensor]  # (blocks, x, e0, context, rope, ctx_bias) -> x


def switch_step(plan: SamplingPlan) -> int:
    """Index of the plan's first low-noise step (``len(plan)`` when the high-noise expert runs throughout)."""
    return next((s.index for s in plan if s.expert == LOW_NOISE), len(plan))


class StepRun:
    """One generation's state: the current plan step, the branch cursor, and the counters.

    ``computed`` / ``skipped`` count block-stack evaluations per branch (a batched CFG call
    is two); ``blocks_run`` counts the transformer blocks actually run, per branch (a first-block
    cache still runs one block when it skips); ``trace`` lists ``(step, branches, skipped)`` per call.
    """

    kind = "step cache"

    def __init__(self, plan: SamplingPlan):
        self.plan = plan
        self.step: PlanStep | None = None
        self._next_branch = 0
        self.computed = 0
        self.skipped = 0
        self.blocks_run = 0
        self.trace: list[tuple[int, tuple[int, ...], bool]] = []
        self._owner: StepCache | None = None
        self._saved: list[tuple[torch.nn.Module, BlockRunner | None]] = []

    def begin_step(self, step: PlanStep) -> None:
        """Called by the loop before each step's forward passes."""
        self.step = step
        self._next_branch = 0

    def take_branches(self, batch: int) -> tuple[int, ...]:
        """The branches a call with ``batch`` samples belongs to (the step's next ones, in order)."""
        if self.step is None:
            raise RuntimeError(f"{self.kind}: the block stack ran before begin_step(); "
                               f"step caches run inside run_plan(..., cache=...)")
        first = self._next_branch
        self._next_branch += batch
        return tuple(range(first, first + batch))

    def record(self, branches: tuple[int, ...], skipped: bool, blocks_run: int) -> None:
        """Count one block-stack call: its branches, skipped or not, and the blocks it ran per branch."""
        self.blocks_run += blocks_run * len(branches)
        if skipped:
            self.skipped += len(branches)
        else:
            self.computed += len(branches)
        self.trace.append((self.step.index, branches, skipped))

    def run(self, inner: BlockRunner, blocks, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
            rope: torch.Tensor, ctx_bias: torch.Tensor | None) -> torch.Tensor:
        """The block runner: ``x [B, L, dim]`` -> ``[B, L, dim]``; ``inner`` runs the blocks for real."""
        raise NotImplementedError

    def install(self, experts: Sequence[torch.nn.Module], owner: "StepCache | None" = None) -> None:
        """Become the block runner of every expert; a runner already set (another wrapper) is kept
        inside and called to compute."""
        self._owner = owner
        try:
            for expert in {id(e): e for e in experts}.values():
                if not hasattr(expert, "block_runner"):
                    raise TypeError(f"{self.kind} needs WanDiT experts (with a block_runner), "
                                    f"got {type(expert).__name__}")
                self._saved.append((expert, expert.block_runner))
                expert.block_runner = partial(self.run, expert.block_runner or run_blocks)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        """Give every expert its previous runner back and leave the counters on the owning cache."""
        for expert, previous in reversed(self._saved):
            expert.block_runner = previous
        self._saved = []
        if self._owner is not None:
            self._owner.last_stats, self._owner.current = self.stats(), None

    def stats(self) -> dict[str, Any]:
        total = self.computed + self.skipped
        return {"kind": self.kind, "computed": self.computed, "skipped": self.skipped, "evaluations": total,
                "blocks_run": self.blocks_run, "steps": len(self.plan)}


def summary_line(stats: dict[str, Any] | None) -> str:
    """``magcache: 34 of 50 block-stack runs computed (16 skipped, 1.47x fewer)``, for the progress line."""
    if not stats:
        return ""
    total, computed = stats["evaluations"], stats["computed"]
    fewer = f", {total / computed:.2f}x fewer" if computed else ""
    return f"{stats['kind']}: {computed} of {total} block-stack runs computed ({stats['skipped']} skipped{fewer})"


class StepCache:
    """A reusable step-cache setting; each generation gets its own :class:`StepRun` from :meth:`attach`."""

    kind = "step cache"
    current: StepRun | None = None  # the run in progress (its stats() feed a live progress line)
    last_stats: dict[str, Any] | None = None  # the counters of the last finished (or stopped) run

    def start(self, plan: SamplingPlan) -> StepRun:
        """A fresh run over ``plan`` (not yet installed)."""
        raise NotImplementedError

    def attach(self, experts: Sequence[torch.nn.Module], plan: SamplingPlan) -> StepRun:
        """Become the block runner of every expert for one walk of ``plan``; the caller must
        ``detach()`` the returned run (``run_plan`` does, in a ``finally``)."""
        run = self.start(plan)
        run.install(experts, owner=self)
        self.current = run
        return run

    @contextmanager
    def session(self, experts: Sequence[torch.nn.Module], plan: SamplingPlan) -> Iterator[StepRun]:
        """:meth:`attach` ... ``detach()`` as a ``with`` block."""
        run = self.attach(experts, plan)
        try:
            yield run
        finally:
            run.detach()

    def describe(self) -> dict[str, Any]:
        """The settings that change the frames, for the video's recipe."""
        raise NotImplementedError
