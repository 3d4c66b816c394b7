"""Stages 2 and 3 of the demo training: latent statistics of the trained encoder, and the latent cache.

The DiT trains on normalised latents of a fixed set of clips (encoded once), together with the
latent pixels each clip's object touches (the DiT loss weighs them up) and both caption forms.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data import caption
from .recipe import DemoRecipe
from .vae_stage import render_batch


@torch.no_grad()
def latent_stats(vae, recipe: DemoRecipe, seed: int, n: int = 256, batch: int = 16):
    """Per-channel mean and std of the raw posterior mean over ``n`` training clips."""
    rng = np.random.default_rng([seed, 2])
    zs = []
    for start in range(0, n, batch):
        video, _, _ = render_batch(rng, min(batch, n - start), recipe)
        zs.append(vae.encode(video.to(vae.device)).cpu())  # identity-normalised = raw
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # [z, N*T*h*w]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-3).tolist()


def normalised_vae(vae, recipe: DemoRecipe, mean, std):
    """The same weights under a VAEConfig that carries the latent statistics."""
    from ..vae import WanVAE

    out = WanVAE(recipe.vae_config(mean, std)).to(vae.device)
    out.load_state_dict(vae.state_dict())
    return out.eval()


def latent_object_mask(mask: torch.Tensor, temporal_stride: int, spatial_stride: int) -> torch.Tensor:
    """[B,1,F,H,W] pixel object mask -> [B,1,T,h,w] mask of the latent pixels the object touches.

    Latent frame 0 is frame 0 alone and latent frame k >= 1 frames (k-1)·s+1 .. k·s, as the causal
    VAE groups them; a latent pixel counts if the object touches any pixel of its s×s cell.
    """
    b, _, f, h, w = mask.shape
    if (f - 1) % temporal_stride or h % spatial_stride or w % spatial_stride:
        raise ValueError(f"mask of {f}x{h}x{w} does not tile into {temporal_stride}x{spatial_stride}"
                         f"x{spatial_stride} latent cells")
    m = mask.float()
    rest = m[:, :, 1:].reshape(b, 1, (f - 1) // temporal_stride, temporal_stride, h, w).amax(3)
    frames = torch.cat([m[:, :, :1], rest], dim=2)
    return F.max_pool3d(frames, (1, spatial_stride, spatial_stride)) > 0


@torch.no_grad()
def build_cache(vae, recipe: DemoRecipe, seed: int, batch: int = 32) -> dict:
    """Normalised latents of ``recipe.clips`` training clips, the latent pixels each clip's object
    touches, and both caption forms of each clip."""
    rng = np.random.default_rng([seed, 3])
    t_stride, s_stride, _ = vae.cfg.strides
    lat, masks, short, long = [], [], [], []
    for start in range(0, recipe.clips, batch):
        video, mask, specs = render_batch(rng, min(batch, recipe.clips - start), recipe)
        lat.append(vae.encode(video.to(vae.device)).cpu())
        masks.append(latent_object_mask(mask, t_stride, s_stride))
        short += [caption(s) for s in specs]
        long += [caption(s, with_background=True) for s in specs]
    return {"latents": torch.cat(lat), "masks": torch.cat(masks), "short": short, "long": long}
