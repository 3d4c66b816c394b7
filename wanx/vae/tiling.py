"""Spatial tiling: split a large frame into overlapping tiles and blend the results linearly.

Each tile is processed with its own :class:`~wanx.vae.causal.CausalCache` (tiles never share
temporal state). Overlapping regions are blended with weights that ramp linearly across the
overlap, so the weights of all tiles sum to one everywhere; with a single tile the result is
exactly the untiled one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileSpec:
    """Tile size and overlap in *pixels* (multiples of the VAE's spatial stride).

    Defaults (256 px tiles, 64 px overlap) keep a decode tile at 32x32 latents for Wan 2.1 and
    16x16 for Wan 2.2, the sizes where per-tile memory is small and seams are invisible.
    """

    tile: int = 256
    overlap: int = 64

    def validate(self, stride: int) -> None:
        if self.tile % stride or self.overlap % stride:
            raise ValueError(f"TileSpec tile={self.tile} and overlap={self.overlap} must be multiples of "
                             f"the VAE spatial stride {stride}")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(f"TileSpec overlap={self.overlap} must be in [0, tile={self.tile})")


def resolve(tile: "bool | TileSpec | None") -> TileSpec | None:
    """``True`` -> the default spec, ``False``/``None`` -> no tiling."""
    if tile is True:
        return TileSpec()
    if tile is False or tile is None:
        return None
    if isinstance(tile, TileSpec):
        return tile
    raise TypeError(f"tile must be a bool or a TileSpec, got {type(tile).__name__}")


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Start/end pairs covering ``[0, size)`` with tiles of ``tile`` overlapping by at least ``overlap``.

    The last tile is shifted back to end exactly at ``size`` (so it may overlap more).
    """
    if size <= tile:
        return [(0, size)]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _ramp(length: int, lo_overlap: int, hi_overlap: int, device, dtype) -> torch.Tensor:
    """1-D weights: linear ramps over the overlaps with the previous/next tile, 1 elsewhere."""
    w = torch.ones(length, device=device, dtype=dtype)
    if lo_overlap > 0:
        w[:lo_overlap] = (torch.arange(lo_overlap, device=device, dtype=dtype) + 0.5) / lo_overlap
    if hi_overlap > 0:
        w[length - hi_overlap:] = torch.minimum(
            w[length - hi_overlap:],
            (torch.arange(hi_overlap, 0, -1, device=device, dtype=dtype) - 0.5) / hi_overlap)
    return w


def weights_1d(span_list: list[tuple[int, int]], device, dtype) -> list[torch.Tensor]:
    """Per-tile blend weights along one axis; they are normalised later by the weight sum."""
    out = []
    for i, (s, e) in enumerate(span_list):
        lo = span_list[i - 1][1] - s if i > 0 else 0
        hi = e - span_list[i + 1][0] if i + 1 < len(span_list) else 0
        out.append(_ramp(e - s, max(lo, 0), max(hi, 0), device, dtype))
    return out


class Blender:
    """Accumulates weighted tiles of a [B,C,T,H,W] tensor and returns the normalised blend."""

    def __init__(self, shape, ys: list[tuple[int, int]], xs: list[tuple[int, int]], device, dtype):
        self.acc = torch.zeros(shape, device=device, dtype=dtype)
        self.norm = torch.zeros(shape[-2:], device=device, dtype=dtype)
        self.ys, self.xs = ys, xs
        self.wy = weights_1d(ys, device, dtype)
        self.wx = weights_1d(xs, device, dtype)

    def add(self, iy: int, ix: int, tile: torch.Tensor) -> None:
        (y0, y1), (x0, x1) = self.ys[iy], self.xs[ix]
        w = self.wy[iy][:, None] * self.wx[ix][None, :]  # [h, w]
        # An in-place add into a slice is recorded by autograd, so training through tiles works.
        self.acc[..., y0:y1, x0:x1] += tile * w
        self.norm[y0:y1, x0:x1] += w

    def result(self) -> torch.Tensor:
        return self.acc / self.norm
