"""The Wan 2.2 VAE encoder and decoder (z=48, 2x2 pixel patchify, 4x16x16 overall).

Stages are nested modules (``encoder.downsamples.{s}.downsamples.{j}``,
``decoder.upsamples.{s}.upsamples.{j}``) with parameter-free space/time-to-channel shortcuts
(:class:`AvgDown3D`, :class:`DupUp3D`), as in ``vae2_2.py``. The decoder has its own width
``dec_dim``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import VAEConfig
from .causal import CausalCache, CausalConv3d, Resample, ResidualBlock
from .wan21 import CausalDecoder, CausalEncoder, Head, _run, middle

PATCH = 2


def patchify(x: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """[B,C,T,H*p,W*p] -> [B,C*p*p,T,H,W].

    parity: channel index is ``c*p*p + r*p + q`` with r the *width* and q the height sub-index
    (official ``b c f (h q) (w r) -> b (c r q) f h w``).
    """
    b, c, t, hp, wp = x.shape
    x = x.view(b, c, t, hp // p, p, wp // p, p)  # [B, C, T, H, q, W, r]
    x = x.permute(0, 1, 6, 4, 2, 3, 5)  # [B, C, r, q, T, H, W]
    return x.reshape(b, c * p * p, t, hp // p, wp // p)


def unpatchify(x: torch.Tensor, p: int = PATCH) -> torch.Tensor:
    """Inverse of :func:`patchify`: [B,C*p*p,T,H,W] -> [B,C,T,H*p,W*p]."""
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.view(b, c, p, p, t, h, w)  # [B, C, r, q, T, H, W]
    x = x.permute(0, 1, 4, 5, 3, 6, 2)  # [B, C, T, H, q, W, r]
    return x.reshape(b, c, t, h * p, w * p)


class AvgDown3D(nn.Module):
    """Parameter-free shortcut: fold (ft, fs, fs) sub-positions into channels, then average groups."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if (in_channels * factor) % out_channels:
            raise ValueError("AvgDown3D: in_channels * factor must be a multiple of out_channels")
        self.group = in_channels * factor // out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        # parity: pad zeros in *front* to a multiple of ft; a 1-frame first chunk averages with a
        # zero frame.
        pad_t = (ft - x.shape[2] % ft) % ft
        if pad_t:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs)  # [B, C, T', ft, H', fs, W', fs]
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # [B, C, ft, fs, fs, T', H', W']
        x = x.reshape(b, self.out_channels, self.group, t // ft, h // fs, w // fs)  # [B, C_out, G, T', H', W']
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Parameter-free shortcut: repeat channels, then unfold them into (ft, fs, fs) sub-positions."""

    def __init__(self, in_channels: int, out_channels: int, factor_t: int, factor_s: int = 1):
        super().__init__()
        self.out_channels, self.ft, self.fs = out_channels, factor_t, factor_s
        factor = factor_t * factor_s * factor_s
        if (out_channels * factor) % in_channels:
            raise ValueError("DupUp3D: out_channels * factor must be a multiple of in_channels")
        self.repeats = out_channels * factor // in_channels

    def forward(self, x: torch.Tensor, first_chunk: bool = False) -> torch.Tensor:
        ft, fs, c = self.ft, self.fs, self.out_channels
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)  # [B, C_out*ft*fs*fs, T, H, W]
        x = x.view(b, c, ft, fs, fs, t, h, w)
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # [B, C_out, T, ft, H, fs, W, fs]
        x = x.reshape(b, c, t * ft, h * fs, w * fs)
        if first_chunk:
            # Matches the decoder's main path, which does not upsample the first chunk in time.
            x = x[:, :, ft - 1:]
        return x


class DownBlock(nn.Module):
    """Residual blocks + optional downsample, plus the :class:`AvgDown3D` shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, n_res: int, temporal: bool, down: bool):
        super().__init__()
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, 2 if temporal else 1, 2 if down else 1)
        layers: list[nn.Module] = []
        for _ in range(n_res):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if down:
            layers.append(Resample(out_dim, "downsample3d" if temporal else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        return _run(self.downsamples, x, cache) + self.avg_shortcut(x)


class UpBlock(nn.Module):
    """Residual blocks + optional upsample, plus the :class:`DupUp3D` shortcut when upsampling."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float, n_res: int, temporal: bool, up: bool):
        super().__init__()
        self.avg_shortcut = DupUp3D(in_dim, out_dim, 2 if temporal else 1, 2) if up else None
        layers: list[nn.Module] = []
        for _ in range(n_res):
            layers.append(ResidualBlock(in_dim, out_dim, dropout))
            in_dim = out_dim
        if up:
            layers.append(Resample(out_dim, "upsample3d" if temporal else "upsample2d", out_dim=out_dim))
        self.upsamples = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        y = _run(self.upsamples, x, cache)
        if self.avg_shortcut is None:
            return y
        first = cache is None or cache.first_chunk
        return y + self.avg_shortcut(x, first_chunk=first)


class Encoder22(CausalEncoder):
    """Patchified pixels [B,12,T,H/2,W/2] -> [B,2z,T',H/16,W/16]."""

    def __init__(self, cfg: VAEConfig, in_channels: int = 3 * PATCH * PATCH):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        tdown = cfg.temperal_downsample
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        self.downsamples = nn.Sequential(*[
            DownBlock(i_d, o_d, cfg.dropout, cfg.num_res_blocks,
                      temporal=tdown[i] if i < len(tdown) else False, down=i != last)
            for i, (i_d, o_d) in enumerate(zip(dims[:-1], dims[1:]))])
        self.middle = middle(dims[-1], cfg.dropout)
        self.head = Head(dims[-1], cfg.z_dim * 2)


class Decoder22(CausalDecoder):
    """Latents [B,z,T,h,w] -> patchified pixels [B,12,T',8h,8w] (unpatchify gives 16x)."""

    def __init__(self, cfg: VAEConfig, out_channels: int = 3 * PATCH * PATCH):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        tup = tuple(cfg.temperal_downsample[::-1])
        last = len(mult) - 1
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle(dims[0], cfg.dropout)
        self.upsamples = nn.Sequential(*[
            UpBlock(i_d, o_d, cfg.dropout, cfg.num_res_blocks + 1,
                    temporal=tup[i] if i < len(tup) else False, up=i != last)
            for i, (i_d, o_d) in enumerate(zip(dims[:-1], dims[1:]))])
        self.head = Head(dims[-1], out_channels)
