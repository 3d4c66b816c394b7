"""3D rotary position embedding of the Wan DiT (frame, height, width axes).

Each head's channels are viewed as ``D/2`` complex numbers made of adjacent pairs
``(x0, x1), (x2, x3), ...``; the first pairs rotate with the frame index, the next with the row,
the last with the column (``D - 4*(D//6) : 2*(D//6) : 2*(D//6)`` channels, 44:42:42 for D=128).
The tables are not parameters: they never appear in a state dict.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

MAX_POSITIONS = 1024  # per axis, as the official tables
THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Complex pairs per axis (t, h, w) for a head of ``head_dim`` channels."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def _axis_freqs(n: int, channels: int) -> torch.Tensor:
    """Complex128 [n, channels/2]: e^{i * pos * theta^(-2j/channels)} for pos < n."""
    # parity: float64 on the CPU, the same formula as the official rope_params.
    inv = 1.0 / torch.pow(THETA, torch.arange(0, channels, 2, dtype=torch.float64, device="cpu") / channels)
    angles = torch.outer(torch.arange(n, device="cpu"), inv)  # [n, channels/2], float64
    return torch.polar(torch.ones_like(angles), angles)


def rope_freqs(grid: tuple[int, int, int], head_dim: int) -> torch.Tensor:
    """Complex128 ``[T*H*W, head_dim/2]`` rotations for the tokens of a (T, H, W) grid, row-major."""
    t, h, w = grid
    if max(grid) > MAX_POSITIONS:
        raise ValueError(f"RoPE supports at most {MAX_POSITIONS} positions per axis, got grid {grid}")
    ct, ch, cw = rope_split(head_dim)
    ft = _axis_freqs(t, 2 * ct)[:, None, None, :].expand(t, h, w, ct)  # [T, H, W, ct]
    fh = _axis_freqs(h, 2 * ch)[None, :, None, :].expand(t, h, w, ch)  # [T, H, W, ch]
    fw = _axis_freqs(w, 2 * cw)[None, None, :, :].expand(t, h, w, cw)  # [T, H, W, cw]
    return torch.cat([ft, fh, fw], dim=-1).reshape(t * h * w, ct + ch + cw)  # [L, D/2]


def rope_tables(grid: tuple[int, int, int], head_dim: int) -> torch.Tensor:
    """complex64 ``[L, 1, D/2]`` rotations for :func:`apply_rope_c64`.

    The angles and their cos/sin are computed in float64 (the official tables); only the finished
    values are rounded to float32.
    """
    return rope_freqs(grid, head_dim).to(torch.complex64)[:, None, :]  # [L, 1, D/2]


def apply_rope_c64(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, L, H, D]`` by a complex64 ``table [L, 1, D/2]``; returns float32 ``[B, L, H, D]``.

    # parity: the official rotates in complex float64 and rounds once to float32. Here the table
    # is float64-exact values rounded to float32 and the product is taken in complex64: a few ulp
    # of difference per element (measured: max |diff| 4.8e-7 = 1e-7 of max |x| on unit-normal q/k
    # at grids up to 21x30x52, bench/NOTES.md), far inside the 1e-5 model tolerance, for a third
    # of the memory traffic of the complex128 path (no float64 copy of q and k).
    """
    b, l, h, d = x.shape
    if torch.compiler.is_compiling():
        return _rotate_real(x, table)
    xc = torch.view_as_complex(x.float().reshape(b, l, h, d // 2, 2))  # [B, L, H, D/2]
    return torch.view_as_real(xc * table).reshape(b, l, h, d)  # [B, L, H, D]


def _rotate_real(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rope_c64` in real arithmetic (inductor generates no code for complex ops, so
    under ``torch.compile`` this form fuses into one pass). Same products as the complex multiply:
    (a + ib)(c + is) = (ac - bs) + i(as + bc)."""
    b, l, h, d = x.shape
    pairs = x.float().reshape(b, l, h, d // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]  # [B, L, H, D/2]
    cos, sin = table.real, table.imag  # [L, 1, D/2]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).reshape(b, l, h, d)


class RopeCache:
    """Per-(grid, device) complex64 tables (see :func:`rope_tables`); oldest evicted first."""

    def __init__(self, head_dim: int, max_entries: int = 8):
        self.head_dim = head_dim
        self.max_entries = max_entries
        self._tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __call__(self, grid: tuple[int, int, int], device: torch.device | str) -> torch.Tensor:
        """The complex64 ``[L, 1, head_dim/2]`` table for ``grid`` on ``device`` (built once, reused every step)."""
        key = (tuple(int(g) for g in grid), str(torch.device(device)))
        table = self._tables.get(key)
        if table is None:
            table = rope_tables(key[0], self.head_dim).to(device)
            self._tables[key] = table
            while len(self._tables) > self.max_entries:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        return table

    def clear(self) -> None:
        self._tables.clear()

    def __len__(self) -> int:
        return len(self._tables)
