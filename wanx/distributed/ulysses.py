"""Ulysses sequence parallelism for :class:`wanx.model.WanDiT`, applied from outside.

Same numerics as the official ``sp_dit_forward`` / ``sp_attn_forward``:

- the patch tokens are zero-padded to ``S = ceil(L / P) * P`` and rank r keeps ``[r*s, (r+1)*s)``
  (per-token time embeddings likewise);
- the RoPE table is padded with 1+0j (identity rotation) and sliced at the same global offsets,
  so every token is rotated by its position in the whole video;
- self-attention exchanges q, k, v with an all-to-all (tokens for heads), attends over the *true*
  L keys only (the official ``k_lens`` masking; here the padded keys are sliced off, which any
  attention backend accepts) and exchanges back;
- after the blocks the chunks are all-gathered and the padding dropped.

Two seams, no change to the block code or the state dict: ``WanDiT.block_runner`` shards around
the block stack, and each block's ``self_attn`` gets the subclass :class:`UlyssesAttention`
(``module.__class__`` swap, the way FSDP2's ``fully_shard`` extends a module). Cross-attention
needs nothing: local queries attend to the whole text. The head runs on the gathered tokens on
every rank (a norm and one linear: cheap next to the blocks).
Axis letters: B batch, L true tokens, S padded tokens, s = S / P, N heads, D head size.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..model.attention import attention
from ..model.dit import Attention, WanDiT, run_blocks
from ..model.rope import apply_rope_c64
from .comm import gather_cat, heads_to_sequence, sequence_to_heads


class UlyssesState:
    """What a forward's self-attentions share: the group and the true token count of this pass."""

    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.true_len: int | None = None  # set by the runner for the duration of the block stack


class UlyssesAttention(Attention):
    """Self-attention over a token chunk; heads are exchanged so each rank attends over all tokens."""

    ulysses: UlyssesState

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
        state = self.ulysses
        if context is not None or state.true_len is None:  # not inside a sharded pass
            return super().forward(x, context, rope=rope, bias=bias)
        dtype = self.q.weight.dtype
        x = x.to(dtype)
        b, s, n, d = x.shape[0], x.shape[1], self.num_heads, self.head_dim
        # The projections of Attention.forward (qk RMSNorm spans all heads, so it runs before the exchange).
        q = self.norm_q(self.q(x)).view(b, s, n, d)  # [B, s, N, D]
        k = self.norm_k(self.k(x)).view(b, s, n, d)  # [B, s, N, D]
        v = self.v(x).view(b, s, n, d)  # [B, s, N, D]
        q, k = apply_rope_c64(q, rope), apply_rope_c64(k, rope)  # float32, global positions
        q, k, v = (heads_to_sequence(u, state.group) for u in (q, k, v))  # [B, S, N/P, D]
        keep = state.true_len  # parity: padded keys never get attention weight (official k_lens)
        out = attention(q, k[:, :keep], v[:, :keep], bias=bias)  # [B, S, N/P, D]
        out = sequence_to_heads(out, state.group)  # [B, s, N, D]
        return self.o(out.flatten(2))  # [B, s, dim]


class UlyssesRunner:
    """``WanDiT.block_runner`` that runs the block stack on this rank's slice of the tokens."""

    def __init__(self, state: UlyssesState, inner=None):
        self.state = state
        self.inner = inner or run_blocks

    def __call__(self, blocks, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: torch.Tensor,
                 ctx_bias: torch.Tensor | None) -> torch.Tensor:
        p, r = self.state.size, self.state.rank
        length = x.shape[1]
        s = math.ceil(length / p)
        pad = s * p - length
        x = F.pad(x, (0, 0, 0, pad))[:, r * s:(r + 1) * s]  # [B, s, dim]; zero tokens past L
        if e0.shape[1] != 1:  # per-token timesteps (ti2v): sliced like the tokens
            e0 = F.pad(e0, (0, 0, 0, 0, 0, pad))[:, r * s:(r + 1) * s]  # [B, s, 6, dim]
        ones = torch.ones((pad, *rope.shape[1:]), dtype=rope.dtype, device=rope.device)
        rope = torch.cat([rope, ones])[r * s:(r + 1) * s]  # [s, 1, D/2]: padding rotates by 1+0j
        self.state.true_len = length
        try:
            x = self.inner(blocks, x, e0, context, rope, ctx_bias)  # [B, s, dim]
        finally:
            self.state.true_len = None
        return gather_cat(x, 1, self.state.group)[:, :length]  # [B, L, dim]


def apply_ulysses(model: WanDiT, group) -> WanDiT:
    """Split ``model``'s token sequence over ``group`` (in place; returns the model).

    Every rank of the group must call the model with the same inputs. ``num_heads`` must be a
    multiple of the group size (see :func:`wanx.distributed.check_parallel`).
    """
    size = dist.get_world_size(group)
    if model.cfg.num_heads % size:
        raise ValueError(f"{model.cfg.num_heads} heads cannot be split over {size} ranks")
    if model.block_runner is not None and not isinstance(model.block_runner, UlyssesRunner):
        # A step cache decides per call from the tokens it sees; on a shard, ranks could disagree.
        raise ValueError("a block runner (step cache?) is already set; apply Ulysses first, and only "
                         "with caches that decide on gathered values")
    state = UlyssesState(group)
    for block in model.blocks:
        attn = block.self_attn
        if type(attn) is Attention:
            attn.__class__ = UlyssesAttention
        elif not isinstance(attn, UlyssesAttention):
            raise TypeError(f"unexpected self-attention type {type(attn).__name__}")
        attn.ulysses = state
    model.block_runner = UlyssesRunner(state)
    return model


def remove_ulysses(model: WanDiT) -> WanDiT:
    """Undo :func:`apply_ulysses` (the model runs whole again)."""
    for block in model.blocks:
        attn = block.self_attn
        if isinstance(attn, UlyssesAttention):
            del attn.ulysses
            attn.__class__ = Attention
    if isinstance(model.block_runner, UlyssesRunner):
        model.block_runner = None
    return model
