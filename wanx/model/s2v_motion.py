"""S2V motion context and token positions: the frame-pack motioner and the RoPE tables of S2V.

The S2V sequence is ``[video tokens | reference-image tokens | motion tokens]``. Each segment has
its own (frame, row, column) positions: the video from frame 0, the reference image at frame 30,
and the motion latents at negative frames (the past), compressed 1x / 2x / 4x the further back
they are. A negative position rotates by the conjugate of the positive one, as the official code
does. Axis letters: B batch, T latent frames, h/w latent rows/columns, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .rope import _axis_freqs, rope_split

REF_FRAME_POSITION = 30  # the reference image's temporal RoPE position
ZIP_FRAME_BUCKETS = (1, 2, 16)  # latest, next, farthest motion latents (1x, 2x, 4x compression)


@dataclass(frozen=True)
class PositionBlock:
    """A row-major (frames x rows x cols) block of tokens and the RoPE position of each axis."""

    frames: tuple[int, ...]
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.frames) * len(self.rows) * len(self.cols)


def spread(start: int, span: int, count: int) -> tuple[int, ...]:
    """``count`` integer positions spread over ``span`` positions from ``start`` (negative: backwards).

    # parity: the official ``rope_precompute`` samples with ``np.linspace(...).astype(int)``
    # (truncation) on the magnitudes, then conjugates negative frames; reproduced exactly.
    """
    if start >= 0:
        return tuple(int(v) for v in np.linspace(start, start + span - 1, count).astype(int))
    return tuple(-int(v) for v in np.linspace(-start, -start - span + 1, count).astype(int))


def block(frames: tuple[int, ...], rows: int, cols: int, row_span: int | None = None,
          col_span: int | None = None) -> PositionBlock:
    """Positions of a block with ``rows x cols`` tokens covering ``row_span x col_span`` positions."""
    return PositionBlock(tuple(frames), spread(0, row_span or rows, rows), spread(0, col_span or cols, cols))


def video_positions(grid: tuple[int, int, int]) -> PositionBlock:
    t, h, w = grid
    return block(tuple(range(t)), h, w)


def reference_positions(h: int, w: int) -> PositionBlock:
    return block((REF_FRAME_POSITION,), h, w)


def motion_positions(h: int, w: int) -> list[PositionBlock]:
    """The frame-pack tokens (``h x w`` is the 1x patch grid): latest latent at frame -1, the next two
    (2x) at -3, the farthest 16 (4x) at -19, -14, -9, -4, all spanning the full ``h x w`` positions."""
    b1, b2, b4 = ZIP_FRAME_BUCKETS
    return [block(spread(-b1, b1, 1), h, w),
            block(spread(-(b1 + b2), b2, b2 // 2), h // 2, w // 2, h, w),
            block(spread(-(b1 + b2 + b4), b4, b4 // 4), h // 4, w // 4, h, w)]


def _axis(positions: tuple[int, ...], pairs: int) -> torch.Tensor:
    """complex128 ``[n, pairs]`` rotations at the given (possibly negative) positions."""
    table = _axis_freqs(max(abs(p) for p in positions) + 1, 2 * pairs)
    out = table[[abs(p) for p in positions]]
    negative = torch.tensor([p < 0 for p in positions])[:, None]
    return torch.where(negative, out.conj(), out)


def position_table(blocks: list[PositionBlock], head_dim: int) -> torch.Tensor:
    """complex64 ``[L, 1, head_dim/2]`` RoPE rotations for the concatenated blocks (for ``apply_rope_c64``)."""
    ct, ch, cw = rope_split(head_dim)
    parts = []
    for pb in blocks:
        nf, nh, nw = len(pb.frames), len(pb.rows), len(pb.cols)
        ft = _axis(pb.frames, ct)[:, None, None, :].expand(nf, nh, nw, ct)
        fh = _axis(pb.rows, ch)[None, :, None, :].expand(nf, nh, nw, ch)
        fw = _axis(pb.cols, cw)[None, None, :, :].expand(nf, nh, nw, cw)
        parts.append(torch.cat([ft, fh, fw], dim=-1).reshape(pb.num_tokens, -1))  # [n, D/2]
    # parity: angles and cos/sin in float64 (official tables); rounded once to complex64.
    return torch.cat(parts).to(torch.complex64)[:, None, :]


class FramePackMotioner(nn.Module):
    """Official ``FramePackMotioner``: the last 19 motion latents as 1x / 2x / 4x-compressed tokens.

    The motion latent is zero-padded at the front to 19 frames (or cut to its last 19), then split
    into the farthest 16 | next 2 | latest 1 frames, patchified by ``proj_4x`` (4x8x8), ``proj_2x``
    (2x4x4) and ``proj`` (1x2x2). Token order is latest, 2x, 4x.
    """

    def __init__(self, dim: int, z_dim: int = 16):
        super().__init__()
        self.proj = nn.Conv3d(z_dim, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(z_dim, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(z_dim, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor, add_last_motion: int = 2) -> torch.Tensor:
        """``motion [B, z, Tm, h, w]`` -> tokens ``[B, h/2*w/2 + h/4*w/4 + 4*h/8*w/8, D]``.

        ``add_last_motion`` < 2 blanks the latest 3 latents (0) or 1 latent (1) ("padd" mode).
        """
        b, z, tm, h, w = motion.shape
        if h % 8 or w % 8:
            raise ValueError(f"frame packing needs latent sizes divisible by 8, got {h}x{w}")
        total = sum(ZIP_FRAME_BUCKETS)
        dtype = self.proj.weight.dtype
        packed = motion.new_zeros(b, z, total, h, w, dtype=dtype)  # [B, z, 19, h, w]
        keep = min(total, tm)
        if keep:
            packed[:, :, total - keep:] = motion[:, :, tm - keep:].to(dtype)
        if add_last_motion < 2:
            blank = sum(ZIP_FRAME_BUCKETS[:len(ZIP_FRAME_BUCKETS) - add_last_motion - 1])
            packed[:, :, total - blank:] = 0
        far, near, last = packed.split(ZIP_FRAME_BUCKETS[::-1], dim=2)  # 16, 2, 1 frames
        tokens = [conv(part).flatten(2).transpose(1, 2)
                  for conv, part in ((self.proj, last), (self.proj_2x, near), (self.proj_4x, far))]
        return torch.cat(tokens, dim=1)  # [B, Lm, D]
