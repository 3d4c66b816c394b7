"""``WanVAE``: the Wan 2.1 / 2.2 causal video VAE with the official state-dict keys.

Encoding runs the encoder on frame 0 alone and then on chunks of 4 frames; decoding runs the
decoder on one latent frame at a time (1 pixel frame out for the first, 4 for each later one).
The temporal state between chunks is an explicit :class:`CausalCache` per call (per tile).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import VAEConfig
from .causal import CausalCache, CausalConv3d, conv3d
from .tiling import Blender, TileSpec, resolve, spans
from .wan21 import Decoder21, Encoder21
from .wan22 import Decoder22, Encoder22, patchify, unpatchify


def check_frames(num_frames: int) -> None:
    """Raise unless ``num_frames`` is 4n+1 (1, 5, 9, ... 81, 121)."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"the Wan VAE needs 4n+1 frames (1, 5, 9, ..., 81, 121); got {num_frames} frames")


class WanVAE(nn.Module):
    """The Wan causal video VAE; ``cfg.version`` picks the 2.1 (z=16, 8x) or 2.2 (z=48, 16x) layout.

    ``encode`` maps video in [-1, 1] to normalised latents (the posterior mean), ``decode`` maps
    them back. Neither disables gradients: wrap calls in ``torch.no_grad()`` for inference.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if len(cfg.mean) != cfg.z_dim or len(cfg.std) != cfg.z_dim:
            raise ValueError(f"VAEConfig: latents_mean/std need {cfg.z_dim} values (z_dim), "
                             f"got {len(cfg.mean)}/{len(cfg.std)}")
        self.cfg = cfg
        v22 = cfg.version == "2.2"
        self.encoder = (Encoder22 if v22 else Encoder21)(cfg)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = (Decoder22 if v22 else Decoder21)(cfg)

    # ---------------------------------------------------------------- properties and checks
    @property
    def z_dim(self) -> int:
        return self.cfg.z_dim

    @property
    def spatial_stride(self) -> int:
        return self.cfg.spatial_stride

    @property
    def temporal_stride(self) -> int:
        return self.cfg.temporal_stride

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _check_video(self, video: torch.Tensor) -> None:
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W]; got shape {tuple(video.shape)}")
        check_frames(video.shape[2])
        s = self.spatial_stride
        if video.shape[3] % s or video.shape[4] % s:
            raise ValueError(f"video height and width must be divisible by {s} (Wan {self.cfg.version} "
                             f"VAE stride); got {video.shape[3]}x{video.shape[4]}")

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, T, h, w]; got shape {tuple(z.shape)}")

    def _stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mean, 1/std) as fp32 [1, z, 1, 1, 1], the official ``scale`` pair."""
        mean = torch.tensor(self.cfg.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.cfg.std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
        return mean, inv_std

    # ---------------------------------------------------------------- encode
    def encode(self, video: torch.Tensor, tile: bool | TileSpec | None = None) -> torch.Tensor:
        """Video [B,3,F,H,W] in [-1,1] (F = 4n+1) -> normalised latents [B,z,(F-1)/4+1,H/s,W/s] (fp32).

        ``tile=True`` or a :class:`TileSpec` encodes overlapping spatial tiles and blends them.
        """
        self._check_video(video)
        x = video.to(self.dtype)
        spec = resolve(tile)
        mu = self._encode_tiled(x, spec) if spec is not None else self._encode_mu(x)
        mean, inv_std = self._stats(mu.device)
        return (mu.float() - mean) * inv_std

    def _encode_mu(self, x: torch.Tensor) -> torch.Tensor:
        """Un-normalised posterior mean of one (tile of a) video."""
        if self.cfg.version == "2.2":
            x = patchify(x)  # [B, 12, F, H/2, W/2]
        cache = CausalCache()
        outs = []
        for start, stop in _encode_chunks(x.shape[2]):
            outs.append(self.encoder(x[:, :, start:stop], cache))  # [B, 2z, 1, h, w]
            cache.next_chunk()
        h = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]  # [B, 2z, T, h, w]
        # Only the mean half of conv1 is needed: the log-variance is discarded (as officially).
        z = self.z_dim
        return conv3d(h, self.conv1.weight[:z], self.conv1.bias[:z])  # [B, z, T, h, w]

    def _encode_tiled(self, x: torch.Tensor, spec: TileSpec) -> torch.Tensor:
        s = self.spatial_stride
        spec.validate(s)
        b, _, f, hh, ww = x.shape
        ys, xs = spans(hh, spec.tile, spec.overlap), spans(ww, spec.tile, spec.overlap)
        if len(ys) == 1 and len(xs) == 1:
            return self._encode_mu(x)
        lat = lambda sp: [(a // s, e // s) for a, e in sp]  # noqa: E731  pixel -> latent spans
        blend = Blender((b, self.z_dim, (f - 1) // 4 + 1, hh // s, ww // s), lat(ys), lat(xs),
                        x.device, torch.float32)
        for iy, (y0, y1) in enumerate(ys):
            for ix, (x0, x1) in enumerate(xs):
                blend.add(iy, ix, self._encode_mu(x[..., y0:y1, x0:x1]).float())
        return blend.result()

    # ---------------------------------------------------------------- decode
    def decode(self, latents: torch.Tensor, tile: bool | TileSpec | None = None,
               clamp: bool = True) -> torch.Tensor:
        """Normalised latents [B,z,T,h,w] -> video [B,3,1+4(T-1),h*s,w*s] (fp32).

        Clamped to [-1, 1] unless ``clamp=False`` (training wants the raw output). ``tile`` as in
        :meth:`encode`, on latent tiles blended in pixel space.
        """
        chunks = list(self.decode_stream(latents, tile=tile, clamp=clamp))
        return torch.cat(chunks, dim=2) if len(chunks) > 1 else chunks[0]

    def decode_stream(self, latents: torch.Tensor, tile: bool | TileSpec | None = None,
                      clamp: bool = True) -> Iterator[torch.Tensor]:
        """Yield pixel chunks [B,3,n,H,W] as they are produced: n=1 for the first latent frame, then 4.

        Concatenated along frames they equal :meth:`decode` exactly. Memory stays bounded by one
        latent frame's activations plus the causal caches. Arguments are checked at the call.
        """
        self._check_latents(latents)
        spec = resolve(tile)
        if spec is not None:
            spec.validate(self.spatial_stride)
        return self._stream(latents, spec, clamp)

    def _stream(self, latents: torch.Tensor, spec: TileSpec | None, clamp: bool) -> Iterator[torch.Tensor]:
        mean, inv_std = self._stats(latents.device)
        z = (latents.float() / inv_std + mean).to(self.dtype)  # official: z / (1/std) + mean
        x = self.conv2(z)  # [B, z, T, h, w]
        if spec is not None:
            yield from self._decode_tiled(x, spec, clamp)
            return
        cache = CausalCache()
        for t in range(x.shape[2]):
            out = self.decoder(x[:, :, t:t + 1], cache)  # [B, 3 or 12, 1 or 4, H', W']
            cache.next_chunk()
            yield self._to_pixels(out, clamp)

    def _decode_tiled(self, x: torch.Tensor, spec: TileSpec, clamp: bool) -> Iterator[torch.Tensor]:
        s = self.spatial_stride
        b, _, t, h, w = x.shape  # x: latents after conv2, [B, z, T, h, w]
        lt, lo = spec.tile // s, spec.overlap // s  # tile geometry in latents
        ys, xs = spans(h, lt, lo), spans(w, lt, lo)
        px = lambda sp: [(a * s, e * s) for a, e in sp]  # noqa: E731  latent -> pixel spans
        caches = {(iy, ix): CausalCache() for iy in range(len(ys)) for ix in range(len(xs))}
        for ti in range(t):
            frames = 1 if ti == 0 else self.temporal_stride
            blend = Blender((b, 3, frames, h * s, w * s), px(ys), px(xs), x.device, torch.float32)
            for (iy, ix), cache in caches.items():
                (y0, y1), (x0, x1) = ys[iy], xs[ix]
                out = self.decoder(x[:, :, ti:ti + 1, y0:y1, x0:x1], cache)
                cache.next_chunk()
                blend.add(iy, ix, self._to_pixels(out, clamp=False))
            out = blend.result()
            yield out.clamp(-1.0, 1.0) if clamp else out

    def _to_pixels(self, out: torch.Tensor, clamp: bool) -> torch.Tensor:
        if self.cfg.version == "2.2":
            out = unpatchify(out)  # [B, 3, n, H, W]
        out = out.float()
        return out.clamp(-1.0, 1.0) if clamp else out

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``decode(encode(video), clamp=False)`` (for training)."""
        return self.decode(self.encode(video), clamp=False)


def _encode_chunks(num_frames: int) -> list[tuple[int, int]]:
    """Frame ranges fed to the encoder: [0,1), then [1,5), [5,9), ... (official chunking)."""
    return [(0, 1)] + [(1 + 4 * i, 5 + 4 * i) for i in range((num_frames - 1) // 4)]
