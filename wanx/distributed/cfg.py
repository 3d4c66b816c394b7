"""CFG-parallel: the conditional and unconditional passes on the two halves of the ranks.

The pipeline's batched CFG calls the DiT once on a batch of two (cond, uncond). With this applied,
rank c of the cfg group runs only sample c and the two predictions are all-gathered, so every rank
gets the same ``[2, ...]`` velocity, combines it as before and steps the same sampler: latents stay
replicated, nothing else changes (LightX2V's ``cfg_p``). Applied as forward hooks, so the model's
type and state dict are untouched; a call whose batch the group cannot split (guidance 1: one
sample) runs whole on every rank.

Each half computes exactly what a single process computes for that sample alone, i.e. the
pipeline with ``batch_cfg=False``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .comm import gather_cat

_HANDLES = "_wanx_cfg_parallel_handles"


def _split_batch(group_size: int, rank: int, args: tuple, kwargs: dict):
    """This rank's contiguous share of every argument with the batch axis; None if it does not split."""
    x = args[0]
    b = x.shape[0]
    if b % group_size or b == 1:
        return None
    per = b // group_size

    def mine(v):
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
            return v[rank * per:(rank + 1) * per]
        return v

    return tuple(mine(a) for a in args), {k: mine(v) for k, v in kwargs.items()}


def apply_cfg_parallel(model: nn.Module, group) -> nn.Module:
    """Split each batched call of ``model`` over ``group`` (2 ranks for cond/uncond); returns the model."""
    if getattr(model, _HANDLES, None):
        raise ValueError("CFG-parallel is already applied to this model")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    split_calls: list[bool] = []  # per call in flight: whether its output must be gathered

    def before(module, args, kwargs):
        share = _split_batch(size, rank, args, kwargs)
        split_calls.append(share is not None)
        return share

    def after(module, args, kwargs, output):
        if split_calls.pop():
            return gather_cat(output, 0, group)  # [B, ...] in rank order: cond first
        return output

    handles = (model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True))
    setattr(model, _HANDLES, handles)
    return model


def remove_cfg_parallel(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_cfg_parallel`."""
    for handle in getattr(model, _HANDLES, ()):
        handle.remove()
    if hasattr(model, _HANDLES):
        delattr(model, _HANDLES)
    return model
