"""The collectives sequence parallelism needs, on ``all_to_all_single`` and ``all_gather_into_tensor``.

The official code uses the list form ``dist.all_to_all``, which gloo only gained in torch 2.10
(pytorch/pytorch#165435); the single-tensor form has worked on gloo for years, so CPU tests run
on every torch wanx supports. Inference only: these are not autograd functions.
Axis letters: B batch, S full (padded) sequence, s = S / P local sequence, N heads, D head size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """``[B, s, N, D]`` (this rank's tokens, all heads) -> ``[B, S, N/P, D]`` (all tokens, this rank's heads)."""
    p = dist.get_world_size(group)
    b, s, n, d = x.shape
    send = x.reshape(b, s, p, n // p, d).permute(2, 0, 1, 3, 4).contiguous()  # [P, B, s, N/P, D]
    recv = torch.empty_like(send)  # recv[j]: rank j's tokens for my heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, p * s, n // p, d)  # [B, S, N/P, D]


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of :func:`heads_to_sequence`: ``[B, S, N/P, D]`` -> ``[B, s, N, D]``."""
    p = dist.get_world_size(group)
    b, seq, h, d = x.shape
    send = x.reshape(b, p, seq // p, h, d).transpose(0, 1).contiguous()  # [P, B, s, N/P, D]
    recv = torch.empty_like(send)  # recv[j]: my tokens for rank j's heads
    dist.all_to_all_single(recv, send, group=group)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, seq // p, p * h, d)  # [B, s, N, D]


# torch 2.13 renamed all_gather_into_tensor (now deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_cat(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (same shape on every rank)."""
    p = dist.get_world_size(group)
    if p == 1:
        return x
    # Stacked along dim 0 (the only layout gloo's all-gather accepts), then moved to ``dim``.
    out = torch.empty((p * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)  # [P*d0, ...]
    _all_gather_single(out, x.contiguous(), group=group)
    return torch.cat(out.chunk(p), dim=dim)
