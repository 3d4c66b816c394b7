"""Causal video building blocks shared by the Wan 2.1 and Wan 2.2 VAEs.

Every temporal operation is causal: an output frame depends on the current and earlier input
frames only. Videos are processed in chunks (encode: 1 frame, then 4 at a time; decode: one
latent frame at a time) and the state carried from one chunk to the next lives in an explicit
:class:`CausalCache` that the caller creates and passes down. Module and parameter names follow
the official ``vae2_1.py``/``vae2_2.py`` so that official state dicts load unchanged.

Axis letters: B batch, C channels, T frames, H height, W width.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Number of trailing input frames a causal conv remembers between chunks (kernel 3 needs 2).
CACHE_T = 2


class _Rep:
    """Marker for an upsample3d layer that has seen exactly one chunk (official: the string "Rep")."""

    def __repr__(self) -> str:
        return "REP"


REP = _Rep()


class CausalCache:
    """The temporal state of one encode or decode pass, keyed by the module that owns it.

    Create one per video (per tile when tiling); call :meth:`next_chunk` after each chunk.
    Causal convs store the last ``CACHE_T`` frames they were fed; temporal resample layers store
    their own state (see :class:`Resample`).
    """

    def __init__(self) -> None:
        self._state: dict[nn.Module, Any] = {}
        self._derived: dict[tuple[nn.Module, str], Any] = {}
        self.chunk = 0

    @property
    def first_chunk(self) -> bool:
        return self.chunk == 0

    def get(self, module: nn.Module) -> Any:
        """``module``'s state from the previous chunk (None before its first chunk)."""
        return self._state.get(module)

    def set(self, module: nn.Module, value: Any) -> None:
        """Store ``module``'s state for the next chunk."""
        self._state[module] = value

    def next_chunk(self) -> None:
        self.chunk += 1

    def derived(self, owner: nn.Module, tag: str, make: Callable[[], Any]) -> Any:
        """Tensors derived from ``owner``'s weights, made once per pass instead of once per chunk.

        Scoped to this pass, so weight updates between passes are always seen; when training,
        the derived tensors stay in the autograd graph.
        """
        key = (owner, tag)
        if key not in self._derived:
            self._derived[key] = make()
        return self._derived[key]

    def __len__(self) -> int:
        return len(self._state)


def _tail(x: torch.Tensor, n: int) -> torch.Tensor:
    """The last ``n`` frames as an independent tensor (a view would pin the whole chunk)."""
    return x[:, :, -n:].clone()


def _needs_grad(*ts: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in ts)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when no gradient can need the input (``x`` must be a fresh tensor)."""
    return F.silu(x, inplace=not _needs_grad(x))


class RMSNorm(nn.Module):
    """``normalize(x over channels) * sqrt(C) * gamma``; gamma is (C,1,1,1) for video, (C,1,1) for images."""

    eps = 1e-12  # F.normalize's default
    SQUARE_SUM_ELEMENTS = 1 << 24  # 64 MiB of fp32: the largest temporary _inv_norm may allocate

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *((1, 1) if images else (1, 1, 1))))

    def _inv_norm(self, x: torch.Tensor) -> torch.Tensor:
        """sqrt(C) / max(||x||_C, eps) per position, reduced in fp32 (bf16 sums of C squares are coarse)."""
        if x.numel() <= self.SQUARE_SUM_ELEMENTS:
            # vector_norm over a non-innermost dim takes a slow strided path on the CPU (2-10x);
            # square-then-sum is one temporary of x's size, so only for moderate tensors.
            n = x.float().square().sum(dim=1, keepdim=True).sqrt()  # [B, 1, ...]
        else:
            n = torch.linalg.vector_norm(x, dim=1, keepdim=True, dtype=torch.float32)  # [B, 1, ...]
        return (self.scale / n.clamp_min(self.eps)).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self._inv_norm(x) * self.gamma

    def silu_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = silu(norm(x))`` in three passes over memory, written straight into ``out`` (no_grad only)."""
        torch.mul(x, self._inv_norm(x), out=out)
        out.mul_(self.gamma)
        return F.silu(out, inplace=True)


def conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0) -> torch.Tensor:
    """``F.conv3d``, sent straight to oneDNN for fp32 batch-1 inference on the CPU.

    PyTorch picks its kernel with a heuristic written for 4-D inputs: at batch 1 with a kernel of
    at most 3 it uses the slow im2col path unless ``N*C*T*H > 20480`` (it never looks at W). The
    VAE's narrow layers (latent-resolution convs, every layer of small VAEs) fall under it, where
    oneDNN is 3-14x faster (bench/NOTES.md change 8); the result is the same convolution.
    """
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1 and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        padding = (padding,) * 3 if isinstance(padding, int) else tuple(padding)
        return torch.ops.aten.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, padding, stride,
                                                 (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding)


class CausalConv3d(nn.Conv3d):
    """A Conv3d padded ``2*p_t`` frames in front and none behind; spatial padding is symmetric.

    With a cache, the previous chunk's last frames stand in for (part of) the front padding, so a
    chunked pass equals one pass over the whole video.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=0)
        pt, ph, pw = padding if isinstance(padding, tuple) else (padding,) * 3
        self.front_pad = 2 * pt
        self.spatial_pad = (ph, pw)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None,
                norm: RMSNorm | None = None) -> torch.Tensor:
        """Convolve one chunk ``x`` [B,C,T,H,W] (or ``silu(norm(x))`` when ``norm`` is given).

        With ``cache``, the frames remembered from earlier chunks precede ``x`` and are then
        replaced by the last ``CACHE_T`` frames seen.
        """
        return self.conv(*self.prepare(x, cache, norm))

    def prepare(self, x: torch.Tensor, cache: CausalCache | None = None,
                norm: RMSNorm | None = None) -> tuple[torch.Tensor, int]:
        """The conv input (zero frames, remembered frames, then the chunk) and the zero frames still
        to pad; updates the cache. Split from :meth:`forward` so callers can free ``x`` first."""
        cached = cache is not None and self.front_pad > 0
        history = cache.get(self) if cached else None
        hist = 0 if history is None else history.shape[2]
        pad = self.front_pad - hist
        if _needs_grad(x, self.weight):
            inp = x if norm is None else silu(norm(x))
            seen = inp if history is None else torch.cat([history, inp], dim=2)
            zeros = 0
        else:
            # Zero frames go straight into the buffer (no F.pad copy) unless the conv skips them.
            zeros = 0 if self._skips_zeros(hist + x.shape[2], pad) else pad
            seen = _prepend(history, x, norm, zeros)
        if cached:
            # parity: the official rule "keep the last 2 frames; a 1-frame chunk borrows the
            # previous chunk's last frame" is exactly "the last CACHE_T frames seen".
            cache.set(self, _tail(seen[:, :, zeros:], CACHE_T))
        return seen, pad - zeros

    def _skips_zeros(self, frames: int, pad: int) -> bool:
        """True when only one output frame is due, so :meth:`conv` drops the zero frames' taps."""
        return pad > 0 and frames + pad == self.kernel_size[0] and self.stride[0] == 1

    def conv(self, x: torch.Tensor, pad: int | None = None) -> torch.Tensor:
        """The conv over ``x`` preceded by ``pad`` zero frames (default: the full causal padding)."""
        pad = self.front_pad if pad is None else pad
        weight = self.weight
        if self._skips_zeros(x.shape[2], pad):
            # One output frame: the zero frames would only meet the first `pad` taps, so drop both
            # (the first chunk then costs 1/3 of a 3-tap conv; the sum is unchanged). Not memoised:
            # this happens once or twice per pass and a kept copy would cost memory.
            weight = weight[:, :, pad:]
        elif pad > 0:
            x = F.pad(x, (0, 0, 0, 0, pad, 0))  # [B, C, pad + T, H, W]
        if weight.shape[2] == 1 and x.shape[2] == 1 and self.stride[0] == 1:
            # One frame, one tap: a conv2d on a free view, which PyTorch's CPU heuristic sends to
            # oneDNN (conv3d on a single small frame falls back to a ~4x slower im2col path).
            y = F.conv2d(x.squeeze(2), weight.squeeze(2), self.bias, self.stride[1:], self.spatial_pad)
            return y.unsqueeze(2)  # [B, C_out, 1, H', W']
        # Spatial zero padding is done by the conv itself: one copy of the input fewer.
        return conv3d(x, weight, self.bias, self.stride, (0, *self.spatial_pad))


def _prepend(history: torch.Tensor | None, x: torch.Tensor, norm: RMSNorm | None, zeros: int = 0) -> torch.Tensor:
    """``cat([zeros, history, silu(norm(x)) or x], T)`` built in one buffer, with no intermediate copies."""
    if history is None and zeros == 0:
        return x if norm is None else norm.silu_into(x, torch.empty_like(x))
    b, c, t, h, w = x.shape
    k = zeros + (0 if history is None else history.shape[2])
    buf = x.new_empty((b, c, k + t, h, w))  # [B, C, zeros + history + T, H, W]
    buf[:, :, :zeros].zero_()
    if history is not None:
        buf[:, :, zeros:k].copy_(history)
    if norm is None:
        buf[:, :, k:].copy_(x)
    else:
        norm.silu_into(x, buf[:, :, k:])
    return buf


class ResidualBlock(nn.Module):
    """norm-SiLU-conv-norm-SiLU-dropout-conv plus a 1x1x1 conv shortcut when channels change."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        # Indices 0..6 are the official state-dict names (residual.0.gamma, residual.2.weight ...).
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        norm1, _, conv1, norm2, _, drop, conv2 = self.residual
        h = conv1(x, cache, norm=norm1)
        if drop.training and drop.p > 0:
            h = drop(silu(norm2(h)))
            norm2 = None
        buf, pad = conv2.prepare(h, cache, norm=norm2)
        del h  # free the conv1 output before conv2 runs (one chunk-sized tensor less at the peak)
        h = conv2.conv(buf, pad)
        del buf
        s = self.shortcut(x)
        return h + s if _needs_grad(h, s) else h.add_(s)


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention within each frame, plus the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        qkv = self.to_qkv(self.norm(y))  # [B*T, 3C, H, W]
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # [B*T, 1, H*W, 3C]
        q, k, v = qkv.chunk(3, dim=-1)  # each [B*T, 1, H*W, C]
        y = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, H*W, C]
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)  # [B*T, C, H, W]
        y = self.proj(y)
        y = y.reshape(b, t, c, h, w).transpose(1, 2)  # [B, C, T, H, W]
        return x + y


class _Upsample2x(nn.Module):
    """Placeholder at ``resample.0`` (parameter-free); the work is done in :meth:`Resample.forward`."""


class Resample(nn.Module):
    """Spatial 2x down/up sampling per frame, with an optional causal 2x in time.

    Modes: ``downsample2d``, ``downsample3d`` (+ strided ``time_conv``), ``upsample2d``,
    ``upsample3d`` (+ ``time_conv`` doubling the channels, interleaved into 2x frames).
    ``out_dim`` is the channel count after an upsample (the 2.1 decoder halves it).
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        if mode not in ("upsample2d", "upsample3d", "downsample2d", "downsample3d"):
            raise ValueError(f"unknown resample mode {mode!r}")
        self.mode = mode
        if mode.startswith("up"):
            # Index 1 keeps the official name resample.1.{weight,bias}.
            self.resample = nn.Sequential(_Upsample2x(), nn.Conv2d(dim, out_dim or dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self._time_upsample(x, cache)
        x = self._spatial(x, cache)
        if self.mode == "downsample3d" and cache is not None:
            x = self._time_downsample(x, cache)
        return x

    def _spatial(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """The per-frame 2D op, run on [B,C,T,H,W] directly (no (B T) reshape copies)."""
        conv = self.resample[1]
        if self.mode.startswith("up"):
            make = lambda: _subpixel_kernels(conv.weight, conv.bias)  # noqa: E731
            kernels = make() if cache is None else cache.derived(conv, "subpixel", make)
            return _subpixel_conv(x, *kernels)  # [B, C_out, T, 2H, 2W]
        x = F.pad(x, (0, 1, 0, 1))  # right 1, bottom 1: [B, C, T, H+1, W+1]
        return conv3d(x, conv.weight.unsqueeze(2), conv.bias, stride=(1, 2, 2))  # [B, C, T, H/2, W/2]

    def _time_upsample(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        state = cache.get(self)
        if state is None:
            # parity: the first chunk is not upsampled in time (1 frame stays 1); remember "Rep".
            cache.set(self, REP)
            return x
        b, c, t, h, w = x.shape
        if state is REP:
            # parity: right after "Rep" the time conv sees zero padding, not the first chunk, and
            # a 1-frame chunk is remembered as [zeros, frame].
            y = self.time_conv.conv(x)
            cache.set(self, _tail(x, CACHE_T) if t >= CACHE_T else torch.cat([torch.zeros_like(x), x], 2))
        else:
            seen = torch.cat([state, x], dim=2)  # [B, C, 2 + T, H, W]
            cache.set(self, _tail(seen, CACHE_T))
            y = self.time_conv.conv(seen, pad=0)
        y = y.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5)  # [B, C, T, 2, H, W]
        return y.reshape(b, c, t * 2, h, w)  # [B, C, 2T, H, W]: frame pairs interleaved

    def _time_downsample(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        prev = cache.get(self)
        cache.set(self, _tail(x, 1))
        if prev is None:
            # First chunk: kept as is (1 frame in, 1 frame out), only remembered.
            return x
        # Later chunks: stride-2 conv over [previous last frame, chunk]: 5 frames -> 2, 3 -> 1.
        return self.time_conv.conv(torch.cat([prev, x], dim=2))


def _phase_taps(w: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a 3-tap kernel axis into the two 2-tap kernels seen by even/odd outputs after 2x repeat.

    Even output 2i reads inputs (i-1, i, i) -> taps (w0, w1+w2); odd 2i+1 reads (i, i, i+1) -> (w0+w1, w2).
    """
    w0, w1, w2 = w.unbind(dim)
    return torch.stack([w0, w1 + w2], dim), torch.stack([w0 + w1, w2], dim)


def _subpixel_kernels(weight: torch.Tensor, bias: torch.Tensor | None):
    """[O,C,3,3] -> the four phase kernels [4O, C, 2, 2] ((a, c) major) and the bias repeated 4x."""
    rows = _phase_taps(weight, 2)  # (even, odd) rows, each [O, C, 2, 3]
    k = torch.cat([kc for ka in rows for kc in _phase_taps(ka, 3)], 0)
    return k, None if bias is None else bias.repeat(4)


def upsample2x_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``conv2d_3x3(nearest_2x(x))`` per frame, computed from 2x2 kernels on ``x`` (2.25x fewer FLOPs).

    parity: the official code upsamples (nearest-exact, in fp32) and then convolves; repeating
    pixels is exact in any dtype, so only the order of the sums differs (~1e-6 relative).
    x [B,C,T,H,W], weight [O,C,3,3] -> [B,O,T,2H,2W].
    """
    return _subpixel_conv(x, *_subpixel_kernels(weight, bias))


def _subpixel_conv(x: torch.Tensor, k: torch.Tensor, bias4: torch.Tensor | None) -> torch.Tensor:
    """The four output phases (row a, column c) as one conv with 4*O channels over the padded
    input; phase (a, c) of output pixel (i, j) is that conv's output at (i+a, j+c)."""
    b, _, t, h, w = x.shape
    o = k.shape[0] // 4
    xp = F.pad(x, (1, 1, 1, 1))  # [B, C, T, H+2, W+2]
    y = conv3d(xp, k.unsqueeze(2), bias4)  # [B, 4O, T, H+1, W+1]
    y = y.view(b, 2, 2, o, t, h + 1, w + 1)  # [B, a, c, O, T, H+1, W+1]
    if _needs_grad(y):
        phase = [[y[:, a, c, :, :, a:a + h, c:c + w] for c in (0, 1)] for a in (0, 1)]
        out = torch.stack([torch.stack(p, -1) for p in phase], -3)  # [B, O, T, H, 2(a), W, 2(c)]
    else:
        out = x.new_empty((b, o, t, h, 2, w, 2))  # [B, O, T, H, a, W, c]
        for a in (0, 1):
            for c in (0, 1):
                out[:, :, :, :, a, :, c] = y[:, a, c, :, :, a:a + h, c:c + w]
    return out.view(b, o, t, 2 * h, 2 * w)
