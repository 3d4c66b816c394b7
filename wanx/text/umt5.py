"""The umT5 encoder that turns prompt token ids into the DiT's text context.

Module and parameter names follow the official ``T5Encoder`` (``wan/modules/t5.py``) so the official
``models_t5_umt5-xxl-enc-bf16.pth`` loads with ``strict=True`` and no key mapping. Precision follows
the official code: with bf16/fp16 weights the RMS norms and the softmax run in fp32 and everything
else in the weight dtype; with fp32 weights everything is fp32.

Axis letters: B batch, L tokens, H heads, D head dim, C model dim, F feed-forward dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import T5Config

__all__ = ["UMT5Encoder", "relative_position_bucket"]


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written out term by term.

    # parity: the official model (and transformers' ``gelu_new``) evaluate this formula op by op;
    # ``F.gelu(approximate="tanh")`` rounds differently in bf16.
    """
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GeluTanh(nn.Module):
    """Module form of :func:`gelu_tanh` (it sits at index 1 of ``ffn.gate``, as in the official)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


class RMSNorm(nn.Module):
    """T5 layer norm: scale by the root mean square, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # parity: the statistic is fp32 and the product stays fp32 until cast to a half weight dtype.
        x = x * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.type_as(self.weight)
        return self.weight * x


def relative_position_bucket(rel_pos: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of ``rel_pos = key_pos - query_pos``: exact near 0, log-spaced beyond.

    Half the buckets serve positive offsets. In each half, offsets below ``max_exact`` get their
    own bucket and larger ones share log-spaced buckets up to ``max_distance`` (then the last).
    """
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    rel_pos = rel_pos.abs()
    max_exact = half // 2
    # parity: same float32 op order as the official/transformers code, so boundary offsets land in
    # the same bucket. clamp(min=1) only avoids log(0) on entries the `where` discards anyway.
    large = max_exact + (torch.log(rel_pos.clamp(min=1).float() / max_exact)
                         / math.log(max_distance / max_exact) * (half - max_exact)).long()
    large = large.clamp(max=half - 1)
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by the relative-position bucket of each (query, key) pair."""

    def __init__(self, num_buckets: int, num_heads: int, max_distance: int = 128):
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, length: int) -> torch.Tensor:
        """Bias ``[1, H, L, L]`` for self-attention over ``length`` tokens."""
        pos = torch.arange(length, device=self.embedding.weight.device)
        rel = pos[None, :] - pos[:, None]  # [Lq, Lk]: key position minus query position
        bias = self.embedding(relative_position_bucket(rel, self.num_buckets, self.max_distance))  # [L, L, H]
        return bias.permute(2, 0, 1).unsqueeze(0).contiguous()  # [1, H, L, L]


class Attention(nn.Module):
    """Multi-head self-attention without bias terms and without 1/sqrt(d) scaling."""

    def __init__(self, dim: int, dim_attn: int, num_heads: int):
        super().__init__()
        if dim_attn % num_heads:
            raise ValueError(f"dim_attn {dim_attn} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim_attn // num_heads
        self.q = nn.Linear(dim, dim_attn, bias=False)
        self.k = nn.Linear(dim, dim_attn, bias=False)
        self.v = nn.Linear(dim, dim_attn, bias=False)
        self.o = nn.Linear(dim_attn, dim, bias=False)

    def forward(self, x: torch.Tensor, pos_bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``x [B, L, C]``, ``pos_bias [1, H, L, L]``, ``mask [B, L]`` (1 = real token) -> ``[B, L, C]``."""
        b, l, _ = x.shape
        q, k, v = (proj(x).view(b, l, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
                   for proj in (self.q, self.k, self.v))
        bias = pos_bias.to(x.dtype).expand(b, -1, -1, -1)  # [B, H, L, L]
        if mask is not None:
            # parity: padded keys get the dtype's minimum (not -inf), as the official code does.
            bias = bias.masked_fill(mask.view(b, 1, 1, l) == 0, torch.finfo(x.dtype).min)
        # parity: T5 does not scale the logits by 1/sqrt(D); the softmax runs in fp32.
        logits = torch.matmul(q, k.transpose(-1, -2)) + bias  # [B, H, L, L]
        attn = F.softmax(logits.float(), dim=-1).type_as(logits)
        out = torch.matmul(attn, v)  # [B, H, L, D]
        return self.o(out.transpose(1, 2).reshape(b, l, -1))  # [B, L, H*D] -> [B, L, C]


class FeedForward(nn.Module):
    """Gated GELU feed-forward: ``fc2(fc1(x) * gelu_tanh(gate(x)))``."""

    def __init__(self, dim: int, dim_ffn: int):
        super().__init__()
        self.gate = nn.Sequential(nn.Linear(dim, dim_ffn, bias=False), GeluTanh())
        self.fc1 = nn.Linear(dim, dim_ffn, bias=False)
        self.fc2 = nn.Linear(dim_ffn, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * self.gate(x))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    """Pull infinities back into range; only in fp16 and only when one occurred (as the official)."""
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(min=-limit, max=limit)
    return x


class EncoderBlock(nn.Module):
    """Pre-norm block: self-attention then feed-forward, each added to the residual stream."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim, cfg.eps)
        self.attn = Attention(cfg.dim, cfg.dim_attn, cfg.num_heads)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps)
        self.ffn = FeedForward(cfg.dim, cfg.dim_ffn)
        # umT5 gives every layer its own relative-position table; classic T5 shares one (top level).
        self.pos_embedding = (None if cfg.shared_pos
                              else RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, shared_bias: torch.Tensor | None) -> torch.Tensor:
        bias = shared_bias if self.pos_embedding is None else self.pos_embedding(x.shape[1])
        x = _fp16_clamp(x + self.attn(self.norm1(x), bias, mask))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


class UMT5Encoder(nn.Module):
    """The umT5 text encoder with the official state-dict keys.

    ``forward(ids [B, L], mask [B, L]) -> [B, L, dim]``. Positions where ``mask`` is 0 are never
    attended to; their own outputs are finite but meaningless (callers trim them).
    """

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embedding = (RelativePositionBias(cfg.num_buckets, cfg.num_heads, cfg.max_distance)
                              if cfg.shared_pos else None)
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random initialisation at the official scales (a no-op cost on the meta device)."""
        c = self.cfg
        nn.init.normal_(self.token_embedding.weight, std=1.0)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, RelativePositionBias):
                nn.init.normal_(m.embedding.weight, std=(2 * c.num_buckets * c.num_heads) ** -0.5)
            elif isinstance(m, FeedForward):
                nn.init.normal_(m.gate[0].weight, std=c.dim ** -0.5)
                nn.init.normal_(m.fc1.weight, std=c.dim ** -0.5)
                nn.init.normal_(m.fc2.weight, std=c.dim_ffn ** -0.5)
            elif isinstance(m, Attention):
                nn.init.normal_(m.q.weight, std=(c.dim * c.dim_attn) ** -0.5)
                nn.init.normal_(m.k.weight, std=c.dim ** -0.5)
                nn.init.normal_(m.v.weight, std=c.dim ** -0.5)
                nn.init.normal_(m.o.weight, std=(c.num_heads * c.dim_attn) ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``ids [B, L]`` long, ``mask [B, L]`` (1 = token, 0 = padding; None = all tokens) -> ``[B, L, dim]``.

        Trailing columns that are padding in every row are not computed (their outputs are zeros):
        masked keys get zero softmax weight and the relative-position bias depends only on
        offsets, so they cannot change a real token's output. A prompt padded to 512 tokens thus
        costs its real length, not 512 (bench/NOTES.md).
        """
        full = ids.shape[1]
        if mask is not None:
            real = mask.ne(0).any(dim=0)  # [L]: column holds a token in some row
            keep = int(real.nonzero().max()) + 1 if bool(real.any()) else 1
            ids, mask = ids[:, :keep], mask[:, :keep]  # [B, keep]
        x = self.token_embedding(ids)  # [B, L, C]
        shared_bias = self.pos_embedding(ids.shape[1]) if self.pos_embedding is not None else None
        for block in self.blocks:
            x = block(x, mask, shared_bias)
        x = self.norm(x)
        return F.pad(x, (0, 0, 0, full - x.shape[1])) if x.shape[1] < full else x  # [B, L, C]
