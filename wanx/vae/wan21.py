"""The Wan 2.1 VAE encoder and decoder (z=16, 4x8x8), with the official flat module lists.

``encoder.downsamples.{0..10}`` and ``decoder.upsamples.{0..14}`` are flat ``nn.Sequential``s of
residual blocks, optional attention blocks and resample layers, exactly as in ``vae2_1.py``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..configs import VAEConfig
from .causal import AttentionBlock, CausalCache, CausalConv3d, Resample, ResidualBlock, RMSNorm


def _run(layers: nn.Sequential, x: torch.Tensor, cache: CausalCache | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache)
    return x


class Head(nn.Sequential):
    """RMSNorm, SiLU, causal conv (official ``head.0`` / ``head.2``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:  # type: ignore[override]
        return self[2](x, cache, norm=self[0])  # conv(silu(norm(x))), fused when inference-only


def middle(dim: int, dropout: float) -> nn.Sequential:
    """Res, Attn, Res at the lowest resolution (official ``middle.{0,1,2}``)."""
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


class CausalEncoder(nn.Module):
    """conv1 -> downsamples -> middle -> head, sharing one causal cache (both VAE versions)."""

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.downsamples, x, cache)
        x = _run(self.middle, x, cache)
        return self.head(x, cache)


class CausalDecoder(nn.Module):
    """conv1 -> middle -> upsamples -> head, sharing one causal cache (both VAE versions)."""

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return self.head(x, cache)


class Encoder21(CausalEncoder):
    """Pixels [B,3,T,H,W] -> [B,2z,T',H/8,W/8] (mean and log-variance), one chunk at a time."""

    def __init__(self, cfg: VAEConfig, in_channels: int = 3):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(in_channels, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        scale = 1.0
        last = len(cfg.dim_mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                layers.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                scale /= 2.0
        self.downsamples = nn.Sequential(*layers)
        self.middle = middle(dims[-1], cfg.dropout)
        self.head = Head(dims[-1], cfg.z_dim * 2)


class Decoder21(CausalDecoder):
    """Latents [B,z,T,h,w] -> pixels [B,3,T',8h,8w], one latent frame per chunk."""

    def __init__(self, cfg: VAEConfig, out_channels: int = 3):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.decoder_dim * m for m in (mult[-1], *mult[::-1])]
        temporal_up = tuple(cfg.temperal_downsample[::-1])
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle(dims[0], cfg.dropout)
        layers: list[nn.Module] = []
        scale = 1.0 / 2 ** (len(mult) - 2)
        last = len(mult) - 1
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i in (1, 2, 3):
                # The 2.1 upsample convs halve the channels, so later stages start at half width.
                in_dim = in_dim // 2
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(out_dim))
                in_dim = out_dim
            if i != last:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
                layers.append(Resample(out_dim, mode, out_dim=out_dim // 2))
                scale *= 2.0
        self.upsamples = nn.Sequential(*layers)
        self.head = Head(dims[-1], out_channels)
