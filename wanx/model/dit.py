"""The Wan 2.2 diffusion transformer (official ``WanModel``), on batched tensors.

State-dict keys are exactly the official ones, so official checkpoints load with ``strict=True``.
Precision follows the official model under ``autocast(bf16)``: linear layers run in the weight
dtype, while the timestep embedding, all modulation arithmetic, the layer norms, the residual
stream and the output head run in float32 (RoPE in float64). Lines that do this are marked
``# parity:``; do not "simplify" them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import DiTConfig
from .attention import BIAS_BACKENDS, attention, effective_backend
from .rope import RopeCache, apply_rope_c64


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``[cos(t*f), sin(t*f)]`` with ``f = 10000^(-i/(dim/2))``; ``t [N]`` -> float32 ``[N, dim]``."""
    half = dim // 2
    # parity: positions and frequencies in float64, as the official sinusoidal_embedding_1d.
    pos = t.to(torch.float64)
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device).div(half))
    angles = torch.outer(pos, freqs)  # [N, dim/2]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()  # [N, dim]


def modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``normed * (1 + scale) + shift`` in float32, one pass over the activations."""
    # parity: fp32 modulation, as the official (normed is cast up first).
    return torch.addcmul(shift, normed.float(), 1 + scale)


def gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x + y * gate`` in float32 (the residual stream turns fp32 here), one pass."""
    # parity: y and x are promoted to fp32 exactly as the official ``x + y * e`` promotes them.
    return torch.addcmul(x.float(), y.float(), gate)


def linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` computed in float32 whatever the weight dtype (the official fp32-autocast regions)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 and cast back to the input dtype (official ``WanLayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = False):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        # parity: fp32 statistics and affine, then back to the input dtype.
        return F.layer_norm(x.float(), (self.dim,), w, b, self.eps).type_as(x)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim in float32, cast back, then scaled (official ``WanRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # All-fp32: the fused kernel computes the same formula in one pass.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        xf = x.float()
        # parity: normalise in fp32, cast back to x's dtype before the weight multiply.
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over the full width; self-attention when ``context`` is None."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                rope: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, dim]`` (any float dtype) -> ``[B, L, dim]`` in the weight dtype.

        ``rope``: complex64 RoPE table for self-attention; ``bias [B, 1, 1, Lk]``: additive key bias.
        """
        dtype = self.q.weight.dtype
        x = x.to(dtype)
        src = x if context is None else context.to(dtype)
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)  # [B, L, H, D]
        k = self.norm_k(self.k(src)).view(b, -1, n, d)  # [B, Lk, H, D]
        v = self.v(src).view(b, -1, n, d)  # [B, Lk, H, D]
        if rope is not None:
            q, k = apply_rope_c64(q, rope), apply_rope_c64(k, rope)  # float32 [B, L, H, D]
        out = attention(q, k, v, bias=bias)  # [B, L, H, D]
        return self.o(out.flatten(2))  # [B, L, dim]


class Block(nn.Module):
    """One Wan block: modulated self-attention, cross-attention to the text, modulated FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps)
        self.self_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        # Official naming: norm3 is the (affine) cross-attention pre-norm, norm2 the FFN pre-norm.
        self.norm3 = LayerNorm(dim, cfg.eps, affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(dim, cfg.num_heads, cfg.qk_norm, cfg.eps)
        self.norm2 = LayerNorm(dim, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor,
                rope: torch.Tensor, ctx_bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, dim]``, ``e0 [B, L or 1, 6, dim]`` fp32 -> ``[B, L, dim]`` fp32."""
        # parity: modulation in fp32 (bf16 parameter + fp32 e0 promotes to fp32).
        mods = (self.modulation.unsqueeze(0) + e0).unbind(2)  # 6 x [B, L or 1, dim]
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
        h = modulate(self.norm1(x), shift_sa, scale_sa)
        x = gated_add(x, self.self_attn(h, rope=rope), gate_sa)  # parity: residual becomes fp32 here
        x = x + self.cross_attn(self.norm3(x), context=context, bias=ctx_bias)
        h = modulate(self.norm2(x), shift_ff, scale_ff)
        return gated_add(x, self.ffn(h.to(self.ffn[0].weight.dtype)), gate_ff)


class Head(nn.Module):
    """Output head: modulated LayerNorm then a linear map to ``prod(patch) * out_dim`` per token."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``x [B, L, dim]``, raw time embedding ``e [B, L or 1, dim]`` -> fp32 ``[B, L, p*out_dim]``."""
        # parity: the head runs entirely in fp32 (official fp32 autocast region); e gets no SiLU.
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)  # 2 x [B, L or 1, dim]
        return linear_fp32(self.head, self.norm(x).float() * (1 + scale) + shift)


class WanDiT(nn.Module):
    """The Wan 2.2 diffusion transformer with the official state-dict keys."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads or cfg.head_dim % 2:
            raise ValueError(f"dim {cfg.dim} must split into {cfg.num_heads} heads of even size")
        if tuple(cfg.window_size) != (-1, -1):
            raise ValueError("windowed self-attention is not used by any Wan 2.2 model; window_size must be (-1, -1)")
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        # RoPE tables live outside the state dict, computed lazily per grid size.
        self.rope = RopeCache(cfg.head_dim)
        # On CPU run a big inference batch one sample at a time (see _runs_sample_by_sample):
        # "auto" decides by size, True always splits, False always runs one batched pass.
        self.cpu_sample_by_sample: bool | str = "auto"
        # The block stack is run by ``block_runner(blocks, x, e0, context, rope, ctx_bias)``: None runs
        # every block (:func:`run_blocks`); step caches set a wrapper from outside. A plain callable,
        # never an nn.Module (it would enter the state dict).
        self.block_runner = None

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @torch.no_grad()
    def init_weights(self) -> "WanDiT":
        """The official ``WanModel.init_weights`` for training from scratch; returns ``self``.

        Xavier-uniform linears (zero biases) and patch embedding, N(0, 0.02) text and time
        embedding weights, and a zero output head so that a fresh model predicts zero velocity.
        Draws from torch's default generator (seed it first for a reproducible init).
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embedding.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # as a [dim, C*pt*ph*pw] matrix
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        return self

    def compile_blocks(self, **compile_kwargs) -> "WanDiT":
        """``torch.compile`` every transformer block in place (weights and state-dict keys unchanged).

        Only the blocks: they hold nearly all the work, are identical code (one compiled graph
        serves all of them), and leave the data-dependent parts (text compaction, RoPE cache,
        sample-by-sample splitting) in eager Python. Inductor fuses the norm/modulation/gating
        passes around the GEMMs; results agree with eager within fp32 rounding.
        """
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Drop cached RoPE tables (they are rebuilt on the next forward, on the input's device)."""
        self.rope.clear()

    def embed_time(self, t: torch.Tensor, batch: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` ([], [B] or [B, >=L]) -> ``e [B, Lt, dim]`` and ``e0 [B, Lt, 6, dim]`` in fp32, Lt in {1, L}."""
        t = self._timesteps(t, batch, num_tokens)  # [B, Lt]
        # parity: the whole timestep path is fp32 (official fp32 autocast), sinusoid in float64.
        with torch.autocast(t.device.type, enabled=False):
            s = sinusoidal_embedding(t.flatten(), self.cfg.freq_dim).unflatten(0, t.shape)  # [B, Lt, freq]
            e = linear_fp32(self.time_embedding[2], F.silu(linear_fp32(self.time_embedding[0], s)))
            e0 = linear_fp32(self.time_projection[1], F.silu(e)).unflatten(2, (6, self.cfg.dim))
        return e, e0  # [B, Lt, dim], [B, Lt, 6, dim]

    def _can_compact_text(self, x: torch.Tensor) -> bool:
        """Text padding may be folded into a key bias: fp32 weights and a backend that takes a bias.

        Not in bf16/fp16: log(m) rounded to 8 mantissa bits would shift the padding's softmax
        weight by ~1%, more than the official bf16 path's own error. The flash/sage kernels take no bias.
        """
        if self.text_embedding[0].weight.dtype != torch.float32:
            return False
        return effective_backend(x.device, self.cfg.head_dim) in BIAS_BACKENDS

    @staticmethod
    def _timesteps(t: torch.Tensor, batch: int, num_tokens: int) -> torch.Tensor:
        """Normalise t to [B, 1] (one value per sample) or [B, L] (one per token)."""
        if t.dim() == 0 or (t.dim() == 1 and t.numel() == 1):
            return t.reshape(1, 1).expand(batch, 1)  # [B, 1]
        if t.dim() == 1 and t.shape[0] == batch:
            return t[:, None]  # [B, 1]
        if t.dim() == 2 and t.shape[0] in (1, batch) and t.shape[1] >= num_tokens:
            # The official pipeline pads t to seq_len; values past the real tokens are never used.
            return t[:, :num_tokens].expand(batch, num_tokens)  # [B, L]
        raise ValueError(f"t must be [], [B] or [B, >=L] with B={batch}, L={num_tokens}; got {tuple(t.shape)}")

    def embed_text(self, context: torch.Tensor, compact: bool = False,
                   lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Zero-pad ``context [B, L_ctx, text_dim]`` to ``text_len`` and embed -> ``[B, Lk, dim]`` and a key bias.

        All text_len positions are attended (no key mask), as the official model does. Every
        zero row embeds to the same key and value, and ``m`` identical keys weigh in a softmax
        exactly like one of them with ``log(m)`` added to its score. With ``compact`` the trailing
        zero rows are therefore cut down to at least one per sample, and the returned bias
        ``[B, 1, 1, Lk]`` gives each kept one ``log(zero rows it stands for)``: the same result
        as attending all text_len rows, for the cost of the real tokens (bench/NOTES.md).
        Without ``compact`` (or when nothing can be cut) ``Lk = text_len`` and the bias is None.
        """
        b, n, c = context.shape
        text_len = self.cfg.text_len
        if n > text_len or c != self.cfg.text_dim:
            raise ValueError(f"context must be [B, <={text_len}, {self.cfg.text_dim}], "
                             f"got {tuple(context.shape)}")
        context = context.to(self.text_embedding[0].weight.dtype)
        bias = None
        if compact:
            if lengths is not None:
                lens = lengths.to(context.device)  # [B]
            else:  # real length of each sample = 1 + the last row with any nonzero entry
                nonzero = context.ne(0).any(dim=-1)  # [B, n]
                lens = (nonzero * torch.arange(1, n + 1, device=context.device)).amax(dim=1)  # [B]
            keep = min(text_len, int(lens.max()) + 1)  # at least one zero row stands for the padding
            if keep < text_len:
                context = F.pad(context, (0, 0, 0, keep - n)) if keep >= n else context[:, :keep]
                pos = torch.arange(keep, device=context.device)  # [Lk]
                kept_pad = (keep - lens).clamp(min=1)  # zero rows kept, per sample
                # parity: fp32 log of an exact integer ratio; exp(s + log m) == m * exp(s).
                weight = torch.log((text_len - lens).double() / kept_pad.double()).float()  # [B]
                bias = torch.where(pos[None, :] >= lens[:, None], weight[:, None], 0.0)  # [B, Lk]
                bias = bias[:, None, None, :]  # [B, 1, 1, Lk]
                return self.text_embedding(context), bias
        context = F.pad(context, (0, 0, 0, text_len - n))  # [B, text_len, text_dim]
        return self.text_embedding(context), bias

    def patchify(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """``x [B, C_in, T, H, W]`` -> tokens ``[B, L, dim]`` (row-major t, h, w) and the token grid."""
        if x.shape[1] != self.cfg.in_dim:
            raise ValueError(f"expected {self.cfg.in_dim} input channels (x plus y), got {x.shape[1]}")
        if any(s % p for s, p in zip(x.shape[2:], self.cfg.patch_size)):
            raise ValueError(f"latent size {tuple(x.shape[2:])} is not divisible by patch {self.cfg.patch_size}")
        x = self.patch_embedding(x.to(self.dtype))  # [B, dim, T', H', W']
        grid = tuple(x.shape[2:])
        return x.flatten(2).transpose(1, 2), grid  # [B, L, dim]

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Tokens ``[B, L, pt*ph*pw*C]`` (channel fastest) -> ``[B, C, T, H, W]``."""
        b, (t, h, w), (pt, ph, pw), c = x.shape[0], grid, self.cfg.patch_size, self.cfg.out_dim
        x = x.view(b, t, h, w, pt, ph, pw, c)  # [B, T', H', W', pt, ph, pw, C]
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # [B, C, T', pt, H', ph, W', pw]
        return x.reshape(b, c, t * pt, h * ph, w * pw)  # [B, C, T, H, W]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity: ``x [B, C, T, H, W]`` -> float32 ``[B, out_dim, T, H, W]``.

        ``context_lens [B]``: each prompt's length, when the caller knows it (the rows after it
        must be zero); otherwise it is read off the zero rows.
        """
        b = x.shape[0]
        if self._runs_sample_by_sample(x):
            outs = [self._forward_batch(*_sample(i, b, x, t, context, y, context_lens)) for i in range(b)]
            return torch.cat(outs)  # [B, out_dim, T, H, W]
        return self._forward_batch(x, t, context, y, context_lens)

    # One sample's FFN hidden state above this many bytes makes "auto" split a CPU batch.
    SPLIT_BATCH_BYTES = 8 << 20

    def _runs_sample_by_sample(self, x: torch.Tensor) -> bool:
        """Whether a CPU batch runs one sample per pass (same numbers as the batched pass).

        At inference sizes (e.g. batched CFG over thousands of tokens) bigger GEMMs gain nothing on
        a few cores while batch 2 doubles the activations and pushes them over glibc's mmap
        threshold (bench/NOTES.md). Small token counts (training the demo model, tiny models) are
        the opposite: per-op overhead dominates and the per-sample loop made training 3.4x slower.
        """
        mode = self.cpu_sample_by_sample
        if x.shape[0] < 2 or x.device.type != "cpu" or mode is False:
            return False
        if mode is True:
            return True
        pt, ph, pw = self.cfg.patch_size
        tokens = (x.shape[2] // pt) * (x.shape[3] // ph) * (x.shape[4] // pw)
        hidden_bytes = tokens * self.cfg.ffn_dim * 4
        return not torch.is_grad_enabled() and hidden_bytes >= self.SPLIT_BATCH_BYTES

    def _forward_batch(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                       y: torch.Tensor | None, context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """The whole batch in one pass (see :meth:`forward`)."""
        if y is not None:
            x = torch.cat([x, y.to(x.dtype)], dim=1)  # [B, C + C_y, T, H, W]
        x, grid = self.patchify(x)  # [B, L, dim]
        e, e0 = self.embed_time(torch.as_tensor(t, device=x.device), x.shape[0], x.shape[1])
        context, ctx_bias = self.embed_text(context.to(x.device), compact=self._can_compact_text(x),
                                            lengths=context_lens)
        rope = self.rope(grid, x.device)  # [L, 1, head_dim/2] complex64
        runner = self.block_runner or run_blocks
        x = runner(self.blocks, x, e0, context, rope, ctx_bias)  # [B, L, dim] fp32
        with torch.autocast(x.device.type, enabled=False):
            x = self.head(x, e)  # [B, L, p*out_dim]
        return self.unpatchify(x, grid).float()


def run_blocks(blocks, x: torch.Tensor, e0: torch.Tensor, context: torch.Tensor, rope: torch.Tensor,
               ctx_bias: torch.Tensor | None) -> torch.Tensor:
    """Every transformer block in order: ``x [B, L, dim]`` -> ``[B, L, dim]`` fp32."""
    for block in blocks:
        x = block(x, e0, context, rope, ctx_bias)
    return x


def _sample(i: int, b: int, *tensors):
    """Sample ``i`` of a batch of ``b``: tensors with a batch axis are sliced, shared ones kept."""
    def pick(v):
        if v is None:
            return None
        v = torch.as_tensor(v)
        return v[i:i + 1] if v.dim() >= 1 and v.shape[0] == b else v
    return tuple(pick(v) for v in tensors)
