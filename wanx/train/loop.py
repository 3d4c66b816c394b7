"""The optimiser loop every demo training stage runs, and what it is built from.

A stage (VAE, decoder fine-tuning, DiT) says what one step does; :func:`run_stage` owns the rest:
resuming from the stage's checkpoint, the warm-up + cosine learning-rate scale over whichever of
steps and wall time runs out first, the progress bar, log rows every 10 steps, and periodic and
final checkpoints. Every random draw of a step comes from :func:`step_generator`, a pure function
of (seed, stage, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
import torch.nn as nn

from ..atomic import atomic_output


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def step_generator(seed: int, stage: int, step: int, device="cpu") -> torch.Generator:
    """The generator of one step: a pure function of (seed, stage, step), so resume is exact."""
    return torch.Generator(device).manual_seed(((seed * 1000 + stage) * 10_000_019 + step) % (2**63))


class EMA:
    """Exponential moving average of a module's floating tensors (decay warms up as (1+n)/(10+n))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        self.decay, self.updates = sd["decay"], sd["updates"]
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}

    def copy_to(self, module: nn.Module) -> nn.Module:
        module.load_state_dict(self.shadow)
        return module


class Logger:
    """Appends JSON lines (stage, step, loss, ...) to ``log.jsonl`` in the work folder.

    Append-only rather than published atomically: each row is one short write, and rewriting the
    whole log every 10 steps would cost more than the torn last line a crash could leave.
    """

    def __init__(self, path: Path):
        self.path = path

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary: a crash mid-write leaves the previous checkpoint intact.

    Replacing is the point (the run's own checkpoint, rewritten every few minutes); whether the
    work folder may be used at all is checked before the run starts.
    """
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(obj, tmp)


def optimiser_step(loss: torch.Tensor, optimisers: Iterable[torch.optim.Optimizer], params: list) -> torch.Tensor:
    """Backward pass, gradient norm clipped to 1 over ``params``, one step of every optimiser; returns the norm."""
    optimisers = list(optimisers)
    for opt in optimisers:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    for opt in optimisers:
        opt.step()
    return gnorm


class Stage(Protocol):
    """What :func:`run_stage` needs from a training stage."""

    name: str

    def train_step(self, step: int, frac: float, lr_scale: float) -> None:
        """One optimiser step; ``frac`` is the stage's progress in [0, 1), ``lr_scale`` the schedule's factor."""

    def postfix(self) -> dict[str, str]:
        """Figures for the progress bar."""

    def log_rows(self, step: int, lr_scale: float) -> list[dict]:
        """Rows for ``log.jsonl`` (the loop adds ``elapsed``)."""

    def state_dict(self) -> dict:
        """Everything but the step count and time, which the loop adds to the checkpoint."""

    def load_state_dict(self, state: dict) -> None:
        """Restore from a checkpoint written by :func:`run_stage`."""


def run_stage(stage: Stage, ckpt: Path, total: int, warmup: int, *, log: Logger, max_seconds: float = 0.0,
              resume: bool = False, device: torch.device | str = "cpu", progress: bool = True,
              ckpt_seconds: float = 120.0, stop_at: int | None = None) -> tuple[int, float]:
    """Train ``stage`` for ``total`` steps or ``max_seconds`` (0: no cap), whichever ends first.

    Resumes from ``ckpt`` when ``resume`` and it exists; checkpoints there every ``ckpt_seconds``
    and at the end. ``stop_at`` ends the call after that many steps as an interruption would
    (tests of resume). Returns (steps done, seconds spent, resumed time included).
    """
    step, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        stage.load_state_dict(state)
        step, elapsed = state["step"], state["elapsed"]
    bar = progress_bar(total, step, stage.name, progress)
    t_start, t_ckpt = time.perf_counter() - elapsed, time.perf_counter()

    def save():
        save_checkpoint({**stage.state_dict(), "step": step, "elapsed": time.perf_counter() - t_start}, ckpt)

    while step < total and (stop_at is None or step < stop_at):
        elapsed = time.perf_counter() - t_start
        frac = max(step / total, elapsed / max_seconds if max_seconds else 0.0)
        if frac >= 1.0:
            break
        lr_scale = lr_factor(step, frac, warmup)
        stage.train_step(step, frac, lr_scale)
        step += 1
        bar.update(1)
        bar.set_postfix(stage.postfix(), refresh=False)
        if step % 10 == 0 or step == total:
            for row in stage.log_rows(step, lr_scale):
                log.write(**row, elapsed=time.perf_counter() - t_start)
        if time.perf_counter() - t_ckpt > ckpt_seconds:
            save()
            t_ckpt = time.perf_counter()
    bar.close()
    save()
    return step, time.perf_counter() - t_start


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar that redraws at most every 5 s (training logs stay short)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
                mininterval=5.0, dynamic_ncols=True)
