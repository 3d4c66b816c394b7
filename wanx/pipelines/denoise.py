"""The denoising loop: execute a sampling plan with a condition, guidance and a residency policy."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import GenerationError
from ..sampling.guidance import cfg
from ..sampling.plan import PlanStep, SamplingPlan
from ..text import TextContext
from .conditions import Condition

# callback(step, total, plan_step) after each step; it may raise wanx.Cancelled to stop the run.
StepCallback = Callable[[int, int, PlanStep], None]


def guided_velocity(model, latent: torch.Tensor, t: torch.Tensor, ctx: TextContext, ctx_null: TextContext,
                    scale: float, batch_cfg: bool, **dit_inputs) -> torch.Tensor:
    """``v_uncond + g (v_cond - v_uncond)``; one batched forward for both when ``batch_cfg``."""
    if scale == 1.0:  # guidance is a no-op: skip the unconditional pass
        return model(latent, t, ctx.context, context_lens=ctx.lengths, **dit_inputs).float()
    if batch_cfg:
        both = TextContext.cat([ctx, ctx_null])  # [2, L, D], zero-padded past each length
        doubled = {k: v.expand(2, *v.shape[1:]) for k, v in dit_inputs.items()}
        v = model(latent.expand(2, *latent.shape[1:]), t.expand(2, *t.shape[1:]), both.context,
                  context_lens=both.lengths, **doubled).float()
        v_cond, v_uncond = v[:1], v[1:]
    else:
        v_cond = model(latent, t, ctx.context, context_lens=ctx.lengths, **dit_inputs).float()
        v_uncond = model(latent, t, ctx_null.context, context_lens=ctx_null.lengths, **dit_inputs).float()
    return cfg(v_cond, v_uncond, scale)


def run_plan(plan: SamplingPlan, noise: torch.Tensor, condition: Condition, experts: Sequence[torch.nn.Module],
             residency, ctx: TextContext, ctx_null: TextContext, *, batch_cfg: bool = True,
             callback: StepCallback | None = None,
             before_step: Callable[[PlanStep | None], None] | None = None, cache=None) -> torch.Tensor:
    """Walk ``plan`` from ``noise [1, C, T, h, w]``; returns the final latent.

    The residency policy puts each step's expert in place and releases the experts at the end,
    also when the callback cancels the run or anything fails. A step ``cache`` (``wanx.cache``)
    runs the experts' block stacks for this walk only, told each step before it runs.
    """
    device = noise.device
    sampler = plan.make_sampler()
    latent = condition.start(noise)
    cached = cache.attach(experts, plan) if cache is not None else None
    try:
        for step in plan:
            if before_step is not None:
                before_step(step)
            model = residency.activate(experts, step.expert)
            if cached is not None:
                cached.begin_step(step)
            t = condition.timestep(step.timestep.to(device), latent)
            v = guided_velocity(model, latent, t, ctx, ctx_null, step.guide_scale, batch_cfg,
                                **condition.dit_inputs())
            latent = condition.after_step(sampler.step(v, latent))
            if callback is not None:
                callback(step.index + 1, len(plan), step)
    finally:
        if before_step is not None:
            before_step(None)  # None: the run is over, restore what the per-step switches changed
        if cached is not None:
            cached.detach()
        residency.leave_denoise(experts)
    if not torch.isfinite(latent).all():
        raise GenerationError("the sampler produced NaN/inf values; nothing was decoded. Try float32 "
                              "(--dtype float32), fewer steps at a high shift, or check the checkpoint")
    return latent
