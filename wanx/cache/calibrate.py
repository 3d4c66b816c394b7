"""Measure a checkpoint's MagCache ratios: ``wanx calibrate magcache --ckpt_dir DIR --out FILE``.

One uncached generation (no decode) records, per plan step and branch, the mean over tokens of
``|r_t| / |r_{t-1}|`` with ``r`` the block stack's residual, and writes them with the settings
they were measured at to a JSON file that ``MagCache`` loads (``ratios=FILE``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_output, check_output_path
from ..errors import InputError
from ..sampling.plan import SamplingPlan
from .ratios import RatioTable
from .session import BlockRunner, StepCache, StepRun, switch_step

DEMO_PROMPT = "a red circle moving left"  # in the demo model's vocabulary
DEFAULT_PROMPT = "a white cat walks along a sunny garden path, the camera slowly tracking it"


class RatioRecorder(StepCache):
    """A step cache that skips nothing and records the ratios (what calibration runs under)."""

    kind = "magcache-calibration"

    def start(self, plan: SamplingPlan) -> "RatioRecorderRun":
        self.last_run = RatioRecorderRun(plan)
        return self.last_run

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class RatioRecorderRun(StepRun):
    kind = "magcache-calibration"

    def __init__(self, plan: SamplingPlan):
        super().__init__(plan)
        self.ratios: dict[int, list[float | None]] = {}  # branch -> one entry per step
        self._previous: dict[int, tuple[int, torch.Tensor]] = {}  # branch -> (step, residual [1, L, dim])

    def run(self, inner: BlockRunner, blocks, x, e0, context, rope, ctx_bias) -> torch.Tensor:
        branches = self.take_branches(x.shape[0])
        out = inner(blocks, x, e0, context, rope, ctx_bias)
        residual = (out - x).float()  # [B, L, dim]
        step = self.step.index
        for i, b in enumerate(branches):
            series = self.ratios.setdefault(b, [None] * len(self.plan))
            current = residual[i:i + 1]
            before = self._previous.get(b)
            if step == 0:
                series[step] = 1.0  # no previous residual: 1 by definition
            elif before is not None and before[0] == step - 1 and before[1].shape == current.shape:
                norms = current.norm(dim=-1) / before[1].norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
                series[step] = norms.mean().item()  # [1, L] -> mean over tokens
            self._previous[b] = (step, current)
        self.record(branches, False, len(blocks))
        return out

    def table(self, settings: dict[str, Any], source: str) -> RatioTable:
        cond = self.ratios.get(0)
        if cond is None or None in cond:
            raise RuntimeError("calibration did not see the conditional branch at every step")
        uncond = self.ratios.get(1)
        switch = switch_step(self.plan)
        return RatioTable(cond=tuple(cond), uncond=None if uncond is None else tuple(uncond),
                          switch_step=switch if switch < len(self.plan) else None, source=source,
                          settings=settings)


@torch.no_grad()
def denoise_request(pipe, req, cache: StepCache | None = None) -> torch.Tensor:
    """What ``WanPipeline.run`` does up to the final latent, with ``cache`` on the experts."""
    from ..pipelines.denoise import run_plan

    ctx, ctx_null = pipe.encode_prompts(req.prompt, req.negative_prompt)
    condition = pipe.prepare_condition(req)
    return run_plan(pipe.plan(req), pipe.initial_noise(req, req.latent_grid), condition, pipe.experts,
                    pipe.residency, ctx, ctx_null, batch_cfg=pipe.options.batch_cfg, cache=cache)


def calibrate_request(pipe, req, source: str = "calibration") -> RatioTable:
    """Run ``req`` uncached on ``pipe`` and return the ratios it measured, with its settings."""
    recorder = RatioRecorder()
    denoise_request(pipe, req, recorder)
    settings = {"task": pipe.spec.name, "steps": req.sample_steps, "shift": req.sample_shift,
                "solver": req.sample_solver, "size": f"{req.size[0]}*{req.size[1]}", "frame_num": req.frame_num,
                "guide_scale": list(req.guide_scale), "boundary": req.boundary, "seed": req.seed, "prompt": req.prompt, "image": req.image_name,
                "dtype": str(pipe.experts[0].dtype).replace("torch.", ""), "device": pipe.device.type,
                "batch_cfg": pipe.options.batch_cfg, "checkpoint": pipe.checkpoint}
    return recorder.last_run.table(settings, source)


def write_ratios(table: RatioTable, out: str | Path, overwrite: bool = False) -> Path:
    """Write ``table`` as a ratios file, atomically."""
    with atomic_output(out, overwrite=overwrite) as tmp:
        Path(tmp).write_text(json.dumps(table.to_json(), indent=1) + "\n")
    return Path(out)


def calibrate_magcache(pipe, prompt: str, steps: int | None = None, *, out: str | Path | None = None,
                       overwrite: bool = False, seed: int = 0, **request) -> RatioTable:
    """Measure ``pipe``'s MagCache ratios on one generation of ``prompt`` with ``steps`` steps.

    ``request``: the other :meth:`WanPipeline.generate` arguments (size, frame_num, image,
    sample_shift, guide_scale, ...); None means the task default. With ``out`` the table is also
    written there (a ``.json`` file; ``overwrite`` to replace one). Bad input is an InputError
    raised before anything runs.
    """
    if out is not None:
        out = _checked_out(out, overwrite)
    req = pipe.resolve(prompt, sample_steps=steps, seed=seed, **request)
    table = calibrate_request(pipe, req, source=Path(out).name if out is not None else "calibration")
    if out is not None:
        write_ratios(table, out, overwrite)
    return table


def _checked_out(out: str | Path, overwrite: bool) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".json":
        raise InputError("out", f"{{arg}} {path}: the ratios are written as JSON; use a name ending in .json")
    return check_output_path(path, overwrite=overwrite, what="ratios file")
