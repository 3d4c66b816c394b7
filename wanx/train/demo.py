"""Train the built-in demo model: a tiny Wan 2.2 t2v-A14B-style model set on synthetic clips.

Stages (each resumable; state lives in a work folder):

1. ``vae``   – a tiny Wan 2.1-style causal VAE on whole 17-frame clips (unclamped decode,
   foreground-weighted L1+L2, a small noise/L2 latent regulariser), then a per-frame PSNR check;
   ``decoder`` – the decoder alone fine-tuned on whole clips with the encoder frozen (sharper
   shapes; the latents, hence every later stage, are unchanged by it);
2. ``stats`` – per-channel latent mean/std of the trained encoder -> ``VAEConfig.latents_mean/std``;
3. ``cache`` – encode a fixed set of clips to normalised latents (their specs are kept, captions are
   drawn per sample: short or long form, 10% dropped to the empty caption for CFG);
4. ``dit``   – flow matching (x_σ = (1-σ)x0 + σε, target v = ε - x0, t = 1000σ, σ from a
   shifted logit-normal that matches the shipped sampling shift; the squared error weighted up on
   the latent pixels the object touches). A shared DiT is trained over all
   σ for the first part, then forked into the two Wan 2.2 experts (high noise σ >= boundary, low
   noise σ < boundary) that train on their own ranges; the umT5 encoder trains jointly throughout;
   EMA weights are kept for everything and shipped;
5. ``export`` – the official-layout folder ``load_pipeline`` reads (see ``wanx.testing``).

Every random draw is a function of (seed, stage, step), so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import DiTConfig, T5Config, VAEConfig
from .data import (BACKGROUNDS, caption, parse_caption_full, partial_caption, render_clip, sample_spec,
                   to_model_input)

# ------------------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class DemoRecipe:
    """Every size and hyper-parameter of the demo model (``full()`` ships, ``smoke()`` tests)."""

    size: int = 32
    frames: int = 17
    # VAE: the Wan 2.1 layout with one downsampling stage fewer (dim_mult (1, 2, 4): 4x spatial,
    # still 4x temporal, z=16). With the official 8x stride a 32 px frame is a 4x4 latent, an object
    # about 2x2 latent pixels, and the decoder drew squares with round corners (v2's shape ceiling:
    # 62.5% on held-out prompts); at 4x an object spans about 4x4. The DiT patch grows from 1x1 to
    # 2x2 so the DiT still sees 80 tokens. dim 16: at dim 8 every shape came out as one blob.
    vae: dict = field(default_factory=lambda: dict(version="2.1", dim=16, z_dim=16, num_res_blocks=1,
                                                   dim_mult=(1, 2, 4), temperal_downsample=(True, True)))
    vae_steps: int = 2600
    # The first part of VAE training uses the first 9 frames of each clip (3 latent frames: the
    # causal caches already reach their steady state, at about half the cost), the rest whole clips.
    vae_short_frames: int = 9
    vae_short_share: float = 0.7
    vae_batch: int = 4
    vae_lr: float = 5e-4
    vae_fg_weight: float = 8.0  # extra loss weight on (dilated) object pixels: objects are ~10% of a frame
    vae_latent_noise: float = 0.0  # 0.1 (SNR 1 at init) kept the decoder from ever reading objects
    vae_latent_l2: float = 1e-4  # keeps the mean from outgrowing that noise
    # Decoder fine-tuning with the encoder frozen (latents, hence the DiT's data, do not change):
    # whole clips only, at a lower learning rate, to sharpen what the decoder draws (corners).
    decoder_steps: int = 600
    decoder_lr: float = 2e-4
    # text encoder (umT5 layout, word-level vocabulary) and DiT
    t5: dict = field(default_factory=lambda: dict(dim=64, dim_attn=64, dim_ffn=128, num_heads=2,
                                                  num_layers=2, num_buckets=8, max_distance=16))
    dit: dict = field(default_factory=lambda: dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16,
                                                   in_dim=16, out_dim=16, dim=128, ffn_dim=512,
                                                   freq_dim=256, num_heads=4, num_layers=4))
    text_len: int = 16
    clips: int = 4096  # cached training clips (latents)
    stat_clips: int = 256  # clips for the latent statistics
    psnr_clips: int = 32  # held-out clips for the VAE's per-frame PSNR check
    dit_steps: int = 10000  # ~0.3 s each on 2 CPU cores since training stopped splitting batches per sample
    dit_batch: int = 32
    # 5e-4 until v3, 1e-3 in v4-v6. 2e-3 (v7, shipped) ended with 15-18% lower loss and took training
    # captions from 92.5% to 99.2% all-correct; 3e-3 (v8) lowered the loss ~5% more, no better shapes.
    dit_lr: float = 2e-3
    # 0 = frozen at its random initialisation (v10, shipped), as Wan trains against a frozen umT5.
    # Trained jointly at 5e-4 (v7) the encoder made each word's output depend on its neighbours
    # (the "square" token of "a blue square moving left" had cosine 0.52 to the one of "a red
    # square moving left"; 0.97 at init), and the unseen combination came out rounder: held-out
    # all-correct 87.5% -> 91.7% frozen (10 seeds: 87.5% -> 90.0%), training captions equal.
    # 1e-4 (v11): 98.3% / 87.5%.
    t5_lr: float = 0.0
    shared_fraction: float = 0.5  # share of DiT steps before the fork into two experts
    boundary: float = 0.7  # σ (= t/1000) at which the high-noise expert hands over
    shift: float = 2.0  # timestep shift used in training and shipped for sampling
    # Off (the shipped model): the low-noise expert draws σ like the shared model, restricted to
    # [0, boundary). On: σ ~ U[0, boundary), 4x more steps at σ < 0.3. Tried because the low-noise
    # expert rounds square corners (a real square noised to σ = 0.3 and denoised comes back with
    # fill ratio 0.87-0.91 instead of 0.93); it did not help (held-out all-correct 54.2% vs 58.3%).
    low_expert_uniform_sigma: bool = False
    # Extra flow-matching loss weight on latent pixels the object touches (as vae_fg_weight for the
    # VAE; they are a third of the latent pixels). Unweighted (v3) every square came out round
    # (bounding-box fill 0.79-0.85, a circle's 0.76-0.82); x5 raised it to 0.83-0.90 and, with
    # dit_lr 1e-3 (was 5e-4), x9 to 0.85-0.90 and halved the flicker (shipped model).
    dit_fg_weight: float = 8.0
    caption_dropout: float = 0.1
    # Share of the remaining captions trained with one attribute unnamed ("a square moving left"),
    # meant to make each word steer the clip on its own. Off: at 0.25 (v9, on v7's recipe) squares
    # got rounder (train all-correct 93.3% vs 99.2%, held-out 75.0% vs 87.5%).
    attribute_dropout: float = 0.0
    long_caption_share: float = 0.5
    ema_decay: float = 0.998
    warmup: int = 100
    # shipped sampling defaults
    sample_steps: int = 25
    # Chosen on training captions (bench/demo_quality.py --guide-scale G, 3 seeds; all-correct
    # 90.0 / 91.7 / 92.5 / 91.7 / 84.2 / 76.7 / 69.2% for G = 1, 1.5, 1.75, 2, 2.5, 3, 4): above ~2
    # guidance pulls squares' corners in until they read as circles.
    guide_scale: float = 1.75
    sample_fps: int = 8

    @classmethod
    def full(cls) -> "DemoRecipe":
        return cls()

    @classmethod
    def smoke(cls) -> "DemoRecipe":
        """Seconds-sized: 16 px, 5 frames, a 1-layer DiT (for tests)."""
        return cls(size=16, frames=5, vae=dict(version="2.1", dim=4, z_dim=16, num_res_blocks=1,
                                               dim_mult=(1, 2, 4), temperal_downsample=(True, True)),
                   vae_steps=4, decoder_steps=3, vae_batch=2, vae_short_frames=5,
                   t5=dict(dim=16, dim_attn=16, dim_ffn=32, num_heads=2, num_layers=1, num_buckets=8,
                           max_distance=16),
                   dit=dict(model_type="t2v", patch_size=(1, 2, 2), text_len=16, in_dim=16, out_dim=16,
                            dim=32, ffn_dim=64, freq_dim=256, num_heads=2, num_layers=1),
                   clips=16, stat_clips=8, psnr_clips=4, dit_steps=6, dit_batch=4, warmup=2,
                   sample_steps=4)

    def vae_config(self, mean=None, std=None) -> VAEConfig:
        z = self.vae["z_dim"]
        return VAEConfig(**self.vae, latents_mean=tuple(mean) if mean is not None else (0.0,) * z,
                         latents_std=tuple(std) if std is not None else (1.0,) * z)

    def t5_config(self, vocab_size: int) -> T5Config:
        return T5Config(vocab_size=vocab_size, **self.t5)

    def dit_config(self) -> DiTConfig:
        return DiTConfig(text_dim=self.t5["dim"], **self.dit)


# ------------------------------------------------------------------------------------- helpers


def lr_factor(step: int, progress: float, warmup: int) -> float:
    """Linear warm-up, then cosine from 1 to 0.1 over ``progress`` in [0, 1]."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    return warm * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


class EMA:
    """Exponential moving average of a module's floating tensors (decay warms up as (1+n)/(10+n))."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for k, v in module.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        self.decay, self.updates = sd["decay"], sd["updates"]
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}

    def copy_to(self, module: nn.Module) -> nn.Module:
        module.load_state_dict(self.shadow)
        return module


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _gen(seed: int, stage: int, step: int, device="cpu") -> torch.Generator:
    """The generator of one step: a pure function of (seed, stage, step), so resume is exact."""
    return torch.Generator(device).manual_seed(((seed * 1000 + stage) * 10_000_019 + step) % (2**63))


class Logger:
    """Appends JSON lines (stage, step, loss, ...) to ``log.jsonl`` in the work folder."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def _bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled,
                mininterval=5.0, dynamic_ncols=True)


# ------------------------------------------------------------------------------------- clips


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


def _vae_loss(vae, video: torch.Tensor, mask: torch.Tensor, recipe: DemoRecipe, gen: torch.Generator,
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


# ------------------------------------------------------------------------------------- stage 1: VAE


def _run_vae_stage(vae, opt, params, batch_loss: Callable, *, name: str, ckpt: Path, total: int,
                   base_lr: float, warmup: int, max_seconds: float, resume: bool, device: torch.device,
                   log: Logger, progress: bool, ckpt_seconds: float, stop_at: int | None):
    """The optimiser loop of the VAE stages: resume from ``ckpt``, warm-up + cosine LR over
    whichever of steps and ``max_seconds`` (0: no cap) runs out first, gradient clipping, logging,
    periodic and final checkpoints. ``batch_loss(step, frac)`` returns (loss to minimise,
    reconstruction loss to report). Returns (steps, seconds)."""
    step, elapsed = 0, 0.0
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed = state["step"], state["elapsed"]
    bar = _bar(total, step, name, progress)
    t_start, t_ckpt = time.perf_counter() - elapsed, time.perf_counter()

    def save():
        _atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step,
                      "elapsed": time.perf_counter() - t_start}, ckpt)

    while step < total and (stop_at is None or step < stop_at):
        elapsed = time.perf_counter() - t_start
        frac = max(step / total, elapsed / max_seconds if max_seconds else 0.0)
        if frac >= 1.0:
            break
        for g in opt.param_groups:
            g["lr"] = base_lr * lr_factor(step, frac, warmup)
        loss, recon = batch_loss(step, frac)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{recon.item():.4f}", refresh=False)
        if step % 10 == 0 or step == total:
            log.write(stage=name, step=step, loss=recon.item(), lr=opt.param_groups[0]["lr"],
                      gnorm=float(gnorm), elapsed=time.perf_counter() - t_start)
        if time.perf_counter() - t_ckpt > ckpt_seconds:
            save()
            t_ckpt = time.perf_counter()
    bar.close()
    save()
    return step, time.perf_counter() - t_start


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
        return _vae_loss(vae, video.to(device), mask.to(device), recipe, _gen(seed, 1, step, device))

    steps, seconds = _run_vae_stage(
        vae, opt, params, batch_loss, name="vae", ckpt=work / "vae_ckpt.pt", total=recipe.vae_steps,
        base_lr=recipe.vae_lr, warmup=recipe.warmup, max_seconds=max_seconds, resume=resume, device=device,
        log=log, progress=progress, ckpt_seconds=ckpt_seconds, stop_at=stop_at)
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
        _, recon = _vae_loss(vae, video, mask, recipe, _gen(seed, 5, step, device), mu=mu)
        return recon, recon

    vae.train()
    steps, seconds = _run_vae_stage(
        vae, opt, params, batch_loss, name="decoder", ckpt=work / "decoder_ckpt.pt",
        total=recipe.decoder_steps, base_lr=recipe.decoder_lr, warmup=recipe.warmup, max_seconds=0.0,
        resume=resume, device=device, log=log, progress=progress, ckpt_seconds=ckpt_seconds, stop_at=stop_at)
    vae.requires_grad_(True)
    return vae.eval(), steps, seconds


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


# ------------------------------------------------------------------------------------- orchestration

STAGES = ("vae", "decoder", "stats", "cache", "dit", "export")


def _finish_vae_stage(name: str, vae, path: Path, steps: int, seconds: float, recipe: DemoRecipe,
                      seed: int) -> dict:
    """Per-frame PSNR on held-out clips, the weights saved to ``path``, a report line; returns the
    stage's summary entry."""
    psnr = vae_psnr(vae, recipe, seed, n=recipe.psnr_clips)
    torch.save(vae.state_dict(), path)
    print(f"{name}: {steps} steps in {seconds / 60:.1f} min; per-frame PSNR (held-out clips) "
          f"min {min(psnr):.1f} dB, mean {sum(psnr) / len(psnr):.1f} dB", flush=True)
    return dict(steps=steps, seconds=seconds, psnr_per_frame=psnr)


def run_demo(recipe: DemoRecipe, out: Path, work: Path, *, seed: int = 0, device: str = "cpu",
             minutes_vae: float = 0.0, minutes_dit: float = 0.0, resume: bool = False,
             stop_after: str = "export", progress: bool = True, ckpt_seconds: float = 120.0) -> dict:
    """Run every stage (skipping finished ones when ``resume``) and write the demo folder to ``out``.

    ``minutes_*`` cap a stage's wall time (0 = no cap); the LR schedule then follows whichever of
    steps and time runs out first, so an uncapped run is exactly reproducible from its seed.
    Returns the run summary (also written to ``work/summary.json``).
    """
    from ..vae import WanVAE

    work.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    log = Logger(work / "log.jsonl")
    summary_path = work / "summary.json"
    summary = json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
    summary.update(recipe=asdict(recipe), seed=seed, device=str(dev), threads=torch.get_num_threads())

    def done(name: str, **info):
        summary.setdefault("stages", {})[name] = info
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        return name == stop_after

    # 1. VAE
    vae_final = work / "vae_final.pt"
    if resume and vae_final.is_file():
        vae = WanVAE(recipe.vae_config()).to(dev)
        vae.load_state_dict(torch.load(vae_final, map_location=dev, weights_only=True))
    else:
        vae, steps, secs = train_vae(recipe, work, seed, dev, minutes_vae * 60, resume, log, progress,
                                     ckpt_seconds)
        if done("vae", **_finish_vae_stage("vae", vae.eval(), vae_final, steps, secs, recipe, seed)):
            return summary
    vae.eval()
    # 1b. decoder fine-tuning (encoder frozen: the later stages see the same latents)
    decoder_final = work / "vae_decoder.pt"
    if resume and decoder_final.is_file():
        vae.load_state_dict(torch.load(decoder_final, map_location=dev, weights_only=True))
    elif recipe.decoder_steps > 0:
        vae, steps, secs = finetune_decoder(vae, recipe, work, seed, dev, resume, log, progress, ckpt_seconds)
        if done("decoder", **_finish_vae_stage("decoder", vae, decoder_final, steps, secs, recipe, seed)):
            return summary
    # 2. latent statistics
    t0 = time.perf_counter()
    mean, std = latent_stats(vae, recipe, seed, n=recipe.stat_clips)
    vae = normalised_vae(vae, recipe, mean, std)
    if done("stats", seconds=time.perf_counter() - t0, mean=mean, std=std):
        return summary
    # 3. latent cache
    cache_path = work / "latents.pt"
    cache = torch.load(cache_path, weights_only=True) if resume and cache_path.is_file() else None
    if cache is None or "masks" not in cache:  # (caches written before the DiT loss used masks)
        t0 = time.perf_counter()
        cache = build_cache(vae, recipe, seed)
        _atomic_save(cache, cache_path)
        if done("cache", seconds=time.perf_counter() - t0, clips=recipe.clips):
            return summary
    # 4. text encoder + two DiT experts
    tok_dir = work / "tokenizer"
    from ..text.demo_vocab import save_demo_tokenizer

    save_demo_tokenizer(tok_dir, model_max_length=recipe.text_len, overwrite=True)
    result = train_dit(recipe, cache, tok_dir, work, seed, dev, minutes_dit * 60, resume, log, progress,
                       ckpt_seconds)
    if done("dit", steps=result["step"], seconds=result["elapsed"], final_loss=result["final_loss"]):
        return summary
    # 5. export
    write_loss_curve(work / "log.jsonl", work / "loss.png")
    export_folder(out, recipe, vae, result["t5"], result["experts"])
    done("export", folder=str(out))
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------------------- stage 3: cache


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


# ------------------------------------------------------------------------------------- stage 4: DiT


def sample_sigmas(gen: torch.Generator, n: int, shift: float, lo: float = 0.0, hi: float = 1.0,
                  uniform: bool = False) -> torch.Tensor:
    """σ = shift(sigmoid(N(0,1))) restricted to [lo, hi) (by rejection): the sampler's shift, so
    training spends its steps where sampling does; or, with ``uniform``, σ ~ U[lo, hi)."""
    from ..sampling import shift_sigmas

    if uniform:
        return lo + (hi - lo) * torch.rand(n, generator=gen)
    got = torch.empty(0)
    while got.numel() < n:
        s = shift_sigmas(torch.sigmoid(torch.randn(4 * n, generator=gen)), shift)
        got = torch.cat([got, s[(s >= lo) & (s < hi) if hi < 1.0 else (s >= lo)]])
    return got[:n]


def encode_captions(t5, tokenizer, captions: list[str], text_len: int, device) -> torch.Tensor:
    """[B, text_len, dim] contexts, zero after each caption's length (as ``pad_context`` at inference)."""
    ids, mask = tokenizer(captions, text_len=text_len)
    ids, mask = ids.to(device), mask.to(device)
    return t5(ids, mask) * mask[..., None].to(torch.float32)


def pick_captions(gen: torch.Generator, cache: dict, idx: torch.Tensor, recipe: DemoRecipe) -> list[str]:
    """Short or long caption per sample; ``caption_dropout`` of them become "" (the CFG negative)
    and ``attribute_dropout`` of the rest leave one of colour/shape/motion unnamed."""
    # The two extra draws only when partial captions are on, so recipes without them keep their stream.
    u = torch.rand(len(idx), 4 if recipe.attribute_dropout else 2, generator=gen)
    out = []
    for i, row in zip(idx.tolist(), u.tolist()):
        if row[0] < recipe.caption_dropout:
            out.append("")
            continue
        text = cache["long"][i] if row[1] < recipe.long_caption_share else cache["short"][i]
        if recipe.attribute_dropout and row[2] < recipe.attribute_dropout:
            omit = ("colour", "shape", "motion")[min(int(row[3] * 3), 2)]
            text = partial_caption(*parse_caption_full(text), omit=omit)
        out.append(text)
    return out


def flow_matching_loss(model, x0, sigma, ctx, gen, weight: torch.Tensor | None = None):
    """MSE between the predicted and the true velocity ε - x0 at x_σ = (1-σ)x0 + σε, t = 1000σ;
    with ``weight`` ([B,1,T,h,w], per latent pixel) the weighted mean over pixels and channels."""
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    s = sigma.to(x0.device).view(-1, 1, 1, 1, 1)
    xt = (1.0 - s) * x0 + s * eps
    pred = model(xt, sigma.to(x0.device) * 1000.0, ctx)
    if weight is None:
        return F.mse_loss(pred.float(), eps - x0)
    err = (pred.float() - (eps - x0)).square()
    weight = weight.to(err).expand_as(err)
    return (err * weight).sum() / weight.sum()


def train_dit(recipe: DemoRecipe, cache: dict, tok_dir: Path, work: Path, seed: int, device: torch.device,
              max_seconds: float, resume: bool, log: Logger, progress: bool = True,
              ckpt_seconds: float = 120.0, stop_at: int | None = None) -> dict:
    """Jointly train the umT5 encoder and the DiT (shared, then forked into high/low experts).

    Returns the EMA text encoder and experts plus step count, seconds and final losses; checkpoints
    to ``work/dit_ckpt.pt``. ``stop_at`` as in :func:`train_vae`.
    """
    from ..model import WanDiT
    from ..text import Tokenizer, UMT5Encoder

    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_folder(tok_dir, text_len=recipe.text_len)
    t5 = UMT5Encoder(recipe.t5_config(tokenizer.vocab_size)).to(device)
    shared = WanDiT(recipe.dit_config()).init_weights().to(device)
    adam = dict(betas=(0.9, 0.99), weight_decay=0.0)
    models = {"shared": shared}
    opts = {"shared": torch.optim.AdamW(shared.parameters(), lr=recipe.dit_lr, **adam)}
    emas = {"shared": EMA(shared, recipe.ema_decay)}
    # t5_lr 0 freezes the encoder at its initialisation, as Wan trains its DiT against a frozen
    # umT5: without requires_grad it builds no graph and its grads stay None, which both AdamW and
    # the clipping norm skip.
    frozen_t5 = recipe.t5_lr == 0
    t5.requires_grad_(not frozen_t5)
    t5_opt = torch.optim.AdamW(t5.parameters(), lr=recipe.t5_lr, **adam)
    t5_ema = EMA(t5, recipe.ema_decay)
    ranges = {"shared": (0.0, 1.0), "high": (recipe.boundary, 1.0), "low": (0.0, recipe.boundary)}
    step, elapsed, recent = 0, 0.0, {}

    def fork():
        for name in ("high", "low"):
            models[name] = copy.deepcopy(models["shared"])
            opts[name] = torch.optim.AdamW(models[name].parameters(), lr=recipe.dit_lr, **adam)
            opts[name].load_state_dict(opts["shared"].state_dict())
            emas[name] = copy.deepcopy(emas["shared"])
        for d in (models, opts, emas):
            del d["shared"]

    ckpt = work / "dit_ckpt.pt"
    if resume and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        if "shared" not in state["models"]:
            fork()
        for name in models:
            models[name].load_state_dict(state["models"][name])
            opts[name].load_state_dict(state["opts"][name])
            emas[name].load_state_dict(state["emas"][name])
        t5.load_state_dict(state["t5"])
        t5_opt.load_state_dict(state["t5_opt"])
        t5_ema.load_state_dict(state["t5_ema"])
        step, elapsed = state["step"], state["elapsed"]
        recent = state.get("recent", {})  # final losses survive a resume that has no steps left

    latents = cache["latents"]
    # per-latent-pixel loss weights, built once rather than every step
    weights = 1.0 + recipe.dit_fg_weight * cache["masks"].float() if recipe.dit_fg_weight else None
    total = recipe.dit_steps
    bar = _bar(total, step, "dit", progress)
    t_start, t_ckpt = time.perf_counter() - elapsed, time.perf_counter()

    def save():
        _atomic_save({"models": {k: m.state_dict() for k, m in models.items()},
                      "opts": {k: o.state_dict() for k, o in opts.items()},
                      "emas": {k: e.state_dict() for k, e in emas.items()},
                      "t5": t5.state_dict(), "t5_opt": t5_opt.state_dict(), "t5_ema": t5_ema.state_dict(),
                      "step": step, "elapsed": time.perf_counter() - t_start, "recent": recent}, ckpt)

    while step < total and (stop_at is None or step < stop_at):
        elapsed = time.perf_counter() - t_start
        frac = max(step / total, elapsed / max_seconds if max_seconds else 0.0)
        if frac >= 1.0:
            break
        if "shared" in models and frac >= recipe.shared_fraction:
            fork()
        name = "shared" if "shared" in models else ("high" if step % 2 == 0 else "low")
        model, opt = models[name], opts[name]
        lr = lr_factor(step, frac, recipe.warmup)
        for g in opt.param_groups:
            g["lr"] = recipe.dit_lr * lr
        for g in t5_opt.param_groups:
            g["lr"] = recipe.t5_lr * lr
        gen = _gen(seed, 4, step)
        idx = torch.randint(latents.shape[0], (recipe.dit_batch,), generator=gen)
        captions = pick_captions(gen, cache, idx, recipe)
        sigma = sample_sigmas(gen, recipe.dit_batch, recipe.shift, *ranges[name],
                              uniform=name == "low" and recipe.low_expert_uniform_sigma)
        ctx = encode_captions(t5, tokenizer, captions, recipe.text_len, device)
        weight = weights[idx].to(device) if weights is not None else None
        loss = flow_matching_loss(model, latents[idx].to(device), sigma, ctx, gen, weight)
        opt.zero_grad(set_to_none=True)
        t5_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*model.parameters(), *t5.parameters()], 1.0)
        opt.step()
        t5_opt.step()
        emas[name].update(model)
        if not frozen_t5:  # an EMA step on unchanged weights could still move them by rounding
            t5_ema.update(t5)
        step += 1
        recent.setdefault(name, []).append(loss.item())
        recent[name] = recent[name][-50:]
        bar.update(1)
        bar.set_postfix({k: f"{sum(v) / len(v):.4f}" for k, v in recent.items()}, refresh=False)
        if step % 10 == 0 or step == total:
            # one row per model trained lately (the experts alternate, so logging only the
            # current one would drop whichever trains on the other parity)
            for key, vals in recent.items():
                if key in models:
                    log.write(stage="dit", expert=key, step=step, loss=sum(vals[-5:]) / len(vals[-5:]),
                              lr=recipe.dit_lr * lr, elapsed=time.perf_counter() - t_start)
        if time.perf_counter() - t_ckpt > ckpt_seconds:
            save()
            t_ckpt = time.perf_counter()
    bar.close()
    save()
    t5_out = t5_ema.copy_to(copy.deepcopy(t5)).eval()
    if "shared" in models:  # stopped before the fork: both experts are the shared model
        high = low = emas["shared"].copy_to(copy.deepcopy(models["shared"])).eval()
    else:
        high = emas["high"].copy_to(copy.deepcopy(models["high"])).eval()
        low = emas["low"].copy_to(copy.deepcopy(models["low"])).eval()
    final = {k: sum(v) / len(v) for k, v in recent.items()}
    return {"t5": t5_out, "experts": (high, low), "step": step,
            "elapsed": time.perf_counter() - t_start, "final_loss": final}


# ------------------------------------------------------------------------------------- stage 5: export


def export_folder(out: Path, recipe: DemoRecipe, vae, t5, experts) -> Path:
    """Write the official t2v-A14B layout (tiny sizes) plus ``wanx.json``; see ``wanx.testing``."""
    from ..configs import get_task
    from ..loading.dit import save_dit
    from ..loading.t5 import save_t5
    from ..loading.vae import save_vae
    from ..text.demo_vocab import save_demo_tokenizer

    spec = get_task("t2v-A14B")
    out.mkdir(parents=True, exist_ok=True)
    save_demo_tokenizer(out / spec.t5_tokenizer, model_max_length=recipe.text_len)
    save_t5(t5.float(), out / spec.t5_checkpoint)
    save_vae(vae.float(), out / spec.vae_checkpoint)
    for sub, model in zip(spec.expert_dirs, experts):
        save_dit(model.float(), out / sub, layout="official")
    size = f"{recipe.size}*{recipe.size}"
    task = {"base": "t2v-A14B", "supported_sizes": [size], "default_size": size,
            "frame_num": recipe.frames, "sample_steps": recipe.sample_steps, "sample_shift": recipe.shift,
            "guide_scale": [recipe.guide_scale, recipe.guide_scale], "sample_fps": recipe.sample_fps,
            "boundary": recipe.boundary, "text_len": recipe.text_len,
            # The empty caption is what caption dropout trained as "unconditional".
            "negative_prompt": ""}
    meta = {"t5": t5.cfg.to_dict(), "vae": vae.cfg.to_dict(), "task": task}
    (out / "wanx.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------- loss curve


def write_loss_curve(log_path: Path, png: Path, width: int = 900, height: int = 360) -> Path:
    """Two panels (VAE, DiT per expert), log-scale loss against step, smoothed; drawn with PIL."""
    from PIL import Image, ImageDraw

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    series: dict[str, list[tuple[int, float]]] = {}
    vae_steps = max((r["step"] for r in rows if r["stage"] == "vae"), default=0)
    for r in rows:
        if r["stage"] in ("vae", "decoder"):  # decoder fine-tuning continues the VAE's curve
            key, step = r["stage"], r["step"] + (vae_steps if r["stage"] == "decoder" else 0)
        else:
            key, step = f"dit {r.get('expert', '')}".strip(), r["step"]
        series.setdefault(key, []).append((step, r["loss"]))
    colours = {"vae": (40, 90, 200), "decoder": (230, 140, 20), "dit shared": (90, 90, 90),
               "dit high": (210, 60, 40), "dit low": (30, 150, 60)}
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    panels = [("VAE reconstruction loss (then decoder fine-tuning)", ["vae", "decoder"]),
              ("DiT flow-matching loss", [k for k in series if k.startswith("dit")])]
    pw = width // 2
    for p, (title, keys) in enumerate(panels):
        x0, y0, x1, y1 = p * pw + 50, 30, (p + 1) * pw - 15, height - 35
        draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
        draw.text((x0, 8), title, fill=(0, 0, 0))
        pts = [pt for k in keys for pt in series.get(k, [])]
        if not pts:
            continue
        smax = max(s for s, _ in pts)
        vals = [math.log10(max(v, 1e-6)) for _, v in pts]
        lo, hi = min(vals), max(vals)
        hi = hi if hi > lo else lo + 1
        for frac in (0.0, 0.5, 1.0):
            y = y1 - frac * (y1 - y0)
            draw.text((p * pw + 2, y - 6), f"{10 ** (lo + frac * (hi - lo)):.3g}", fill=(0, 0, 0))
        draw.text((x1 - 60, y1 + 5), f"step {smax}", fill=(0, 0, 0))
        for i, k in enumerate(keys):
            data = series.get(k, [])
            if not data:
                continue
            win = 10
            smooth = [(s, sum(math.log10(max(v, 1e-6)) for _, v in data[max(0, j - win):j + 1])
                       / len(data[max(0, j - win):j + 1])) for j, (s, _) in enumerate(data)]
            xy = [(x0 + (x1 - x0) * s / max(smax, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                  for s, v in smooth]
            if len(xy) > 1:
                draw.line(xy, fill=colours.get(k, (0, 0, 0)), width=2)
            draw.text((x0 + 8, y0 + 6 + 12 * i), k, fill=colours.get(k, (0, 0, 0)))
    png.parent.mkdir(parents=True, exist_ok=True)
    img.save(png)
    return png
