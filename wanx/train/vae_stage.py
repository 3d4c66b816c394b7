"""Stage 1 of the demo training: the tiny causal VAE, then its decoder fine-tuned on whole clips.

The VAE (a Wan 2.1 layout, see :class:`~wanx.train.recipe.DemoRecipe`) learns on fresh clips
every step: foreground-weighted L1+L2 on the unclamped decode, a small L2 pull on the latent; the
first ``vae_short_share`` of training on the first ``vae_short_frames`` frames only. Decoder
fine-tuning then trains ``conv2`` and the decoder with the encoder frozen, so the latents (and
every later stage) do not change. Both run the shared loop of :mod:`wanx.train.loop`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import BACKGROUNDS, render_clip, sample_spec, to_model_input
from .loop import Logger, optimiser_step, run_stage, step_generator
from .recipe import DemoRecipe

def render_batch(rng: np.random.Generator, n: int, recipe: DemoRecipe, split: str = "train",
                 frames: int | None = None):
    """``n`` fresh clips: (video [n,3,F,S,S] in [-1,1], object mask [n,1,F,S,S] bool, specs).

    ``frames`` < ``recipe.frames`` renders only the first frames of full-length clips.
    """
    specs = [sample_spec(rng, split, recipe.frames) for _ in range(n)]
    frames = recipe.frames if frames is None else frames
    clips = np.stack([render_clip(s, frames, recipe.size) for s in specs])  # [n,F,S,S,3]
    bg = np.array([BACKGROUNDS[s.background] for s in specs], np.uint8)[:, None, None, None]
    fg = np.any(clips != bg, axis=-1)  # [n,F,S,S]
    mask = torch.from_numpy(fg)[:, None]  # [n,1,F,S,S]
    return to_model_input(clips), mask, specs


def init_vae(vae: nn.Module) -> nn.Module:
    """He-normal convs with zero biases, and residual branches that start at zero (identity blocks).

    PyTorch's default conv init shrinks activations ~1/sqrt(3) per layer while its biases stay, so
    a freshly built tiny VAE encodes every clip to almost the same latent (bias-dominated) and
    training sits on a plateau; with this init the input survives to the latent from step 0.
    """
    from ..vae.causal import ResidualBlock

    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in vae.modules():
            if isinstance(m, ResidualBlock):
                convs = [c for c in m.residual.modules() if isinstance(c, nn.Conv3d)]
                nn.init.zeros_(convs[-1].weight)  # the branch's last conv: the block starts as identity
        head = vae.decoder.head[-1]
        head.weight.mul_(0.1)
    return vae


def vae_loss(vae, video: torch.Tensor, mask: torch.Tensor, recipe: DemoRecipe, gen: torch.Generator,
             mu: torch.Tensor | None = None):
    """Foreground-weighted L1+L2 on the UNCLAMPED reconstruction of a noised posterior mean
    (``mu`` given: the encoder is not run, e.g. frozen for decoder fine-tuning)."""
    if mu is None:
        mu = vae.encode(video)  # [B,z,T,h,w]; identity normalisation while training
    z = mu + recipe.vae_latent_noise * torch.randn(mu.shape, generator=gen, device=mu.device)
    rec = vae.decode(z, clamp=False)
    # Dilate the object mask by one pixel so its anti-aliased rim counts as object.
    fg = F.max_pool3d(mask.float(), (1, 3, 3), stride=1, padding=(0, 1, 1))
    w = 1.0 + recipe.vae_fg_weight * fg
    err = rec - video
    recon = ((err.abs() + err.square()) * w).sum() / (w.sum() * 3)
    return recon + recipe.vae_latent_l2 * mu.square().mean(), recon


@torch.no_grad()
def vae_psnr(vae, recipe: DemoRecipe, seed: int, n: int = 32, batch: int = 8) -> list[float]:
    """Per-frame PSNR (dB, clamped decode, [-1,1] range) over ``n`` fresh clips from the held-out
    triples (the VAE never saw them)."""
    rng = np.random.default_rng([seed, 99])
    se = torch.zeros(recipe.frames)
    count = 0
    for start in range(0, n, batch):
        video, _, _ = render_batch(rng, min(batch, n - start), recipe, split="heldout")
        rec = vae.decode(vae.encode(video))
        se += (rec - video).square().mean(dim=(0, 1, 3, 4)) * video.shape[0]
        count += video.shape[0]
    mse = se / count
    return [float(10 * math.log10(4.0 / max(m, 1e-12))) for m in mse.tolist()]


@dataclass
class VAEStage:
    """One VAE optimiser step for :func:`~wanx.train.loop.run_stage`: ``batch_loss(step, frac)``
    returns (loss to minimise, reconstruction loss to report)."""

    name: str
    vae: nn.Module
    params: list
    opt: torch.optim.Optimizer
    base_lr: float
    batch_loss: Callable[[int, float], tuple[torch.Tensor, torch.Tensor]]
    recon: torch.Tensor | None = None
    gnorm: torch.Tensor | None = None

    def train_step(self, step: int, frac: float, lr_scale: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = self.base_lr * lr_scale
        loss, self.recon = self.batch_loss(step, frac)
        self.gnorm = optimiser_step(loss, [self.opt], self.params)

    def postfix(self) -> dict[str, str]:
        return {"loss": f"{self.recon.item():.4f}"}

    def log_rows(self, step: int, lr_scale: float) -> list[dict]:
        return [dict(stage=self.name, step=step, loss=self.recon.item(), lr=self.opt.param_groups[0]["lr"],
                     gnorm=float(self.gnorm))]

    def state_dict(self) -> dict:
        return {"model": self.vae.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])


def train_vae(recipe: DemoRecipe, work: Path, seed: int, device: torch.device, max_seconds: float,
              resume: bool, log: Logger, progress: bool = True, ckpt_seconds: float = 120.0,
              stop_at: int | None = None):
    """Train the VAE; returns (model, steps, seconds). Checkpoints to ``work/vae_ckpt.pt``.

    ``stop_at`` ends the call after that many steps as an interruption would (tests of resume).
    """
    from ..vae import WanVAE

    torch.manual_seed(seed)
    vae = init_vae(WanVAE(recipe.vae_config())).to(device)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)

    def batch_loss(step: int, frac: float):
        rng = np.random.default_rng([seed, 1, step])
        short = frac < recipe.vae_short_share and recipe.vae_short_frames < recipe.frames
        video, mask, _ = render_batch(rng, recipe.vae_batch, recipe,
                                      frames=recipe.vae_short_frames if short else None)
        return vae_loss(vae, video.to(device), mask.to(device), recipe, step_generator(seed, 1, step, device))

    stage = VAEStage("vae", vae, params, opt, recipe.vae_lr, batch_loss)
    steps, seconds = run_stage(stage, work / "vae_ckpt.pt", recipe.vae_steps, recipe.warmup, log=log,
                               max_seconds=max_seconds, resume=resume, device=device, progress=progress,
                               ckpt_seconds=ckpt_seconds, stop_at=stop_at)
    return vae, steps, seconds


def finetune_decoder(vae, recipe: DemoRecipe, work: Path, seed: int, device: torch.device, resume: bool,
                     log: Logger, progress: bool = True, ckpt_seconds: float = 120.0,
                     stop_at: int | None = None):
    """Train ``conv2`` and the decoder on whole clips while the encoder stays frozen.

    The posterior mean is a function of the encoder alone, so the latent statistics, the latent
    cache and the DiT trained on it are unaffected: this stage can run before or after them.
    Returns (model, steps, seconds); checkpoints to ``work/decoder_ckpt.pt``.
    """
    params = [*vae.conv2.parameters(), *vae.decoder.parameters()]
    for name, p in vae.named_parameters():
        p.requires_grad_(name.startswith(("conv2.", "decoder.")))
    opt = torch.optim.AdamW(params, lr=recipe.decoder_lr, betas=(0.9, 0.99), weight_decay=0.0)

    def batch_loss(step: int, frac: float):
        rng = np.random.default_rng([seed, 5, step])
        video, mask, _ = render_batch(rng, recipe.vae_batch, recipe)
        video, mask = video.to(device), mask.to(device)
        with torch.no_grad():
            mu = vae.encode(video)
        _, recon = vae_loss(vae, video, mask, recipe, step_generator(seed, 5, step, device), mu=mu)
        return recon, recon

    vae.train()
    stage = VAEStage("decoder", vae, params, opt, recipe.decoder_lr, batch_loss)
    # No wall-time cap: the stage is short, and a fixed step count keeps it reproducible.
    steps, seconds = run_stage(stage, work / "decoder_ckpt.pt", recipe.decoder_steps, recipe.warmup, log=log,
                               resume=resume, device=device, progress=progress, ckpt_seconds=ckpt_seconds,
                               stop_at=stop_at)
    vae.requires_grad_(True)
    return vae.eval(), steps, seconds
