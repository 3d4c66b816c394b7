"""Stage 4 of the demo training: the umT5 text encoder and the DiT, shared then two Wan 2.2 experts.

Flow matching: x_σ = (1-σ)x0 + σε, target v = ε - x0, t = 1000σ, σ from a shifted logit-normal
that matches the shipped sampling shift, the squared error weighted up on the latent pixels the
object touches. One DiT trains over all σ for the first ``shared_fraction`` of the stage, then is
forked into the high-noise (σ >= boundary) and low-noise (σ < boundary) experts, which alternate
steps on their own ranges. EMA weights are kept for everything and are what the stage returns.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import parse_caption_full, partial_caption
from .loop import EMA, Logger, optimiser_step, run_stage, step_generator
from .recipe import DemoRecipe

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


_ADAM = dict(betas=(0.9, 0.99), weight_decay=0.0)


class DiTStage:
    """The text encoder and the DiT models (``shared``, or ``high`` and ``low`` after the fork) with
    their optimisers and EMAs, as one stage of :func:`~wanx.train.loop.run_stage`."""

    name = "dit"

    def __init__(self, recipe: DemoRecipe, cache: dict, tokenizer, t5: nn.Module, shared: nn.Module, seed: int,
                 device: torch.device):
        self.recipe, self.cache, self.tokenizer, self.seed, self.device = recipe, cache, tokenizer, seed, device
        self.models = {"shared": shared}
        self.opts = {"shared": torch.optim.AdamW(shared.parameters(), lr=recipe.dit_lr, **_ADAM)}
        self.emas = {"shared": EMA(shared, recipe.ema_decay)}
        # t5_lr 0 freezes the encoder at its initialisation, as Wan trains its DiT against a frozen
        # umT5: without requires_grad it builds no graph and its grads stay None, which both AdamW and
        # the clipping norm skip.
        self.t5, self.frozen_t5 = t5, recipe.t5_lr == 0
        t5.requires_grad_(not self.frozen_t5)
        self.t5_opt = torch.optim.AdamW(t5.parameters(), lr=recipe.t5_lr, **_ADAM)
        self.t5_ema = EMA(t5, recipe.ema_decay)
        # per-latent-pixel loss weights, built once rather than every step
        self.weights = 1.0 + recipe.dit_fg_weight * cache["masks"].float() if recipe.dit_fg_weight else None
        self.recent: dict[str, list[float]] = {}  # the last 50 losses of each model

    def fork(self) -> None:
        """Split the shared model (weights, optimiser state, EMA) into the high- and low-noise experts."""
        for name in ("high", "low"):
            self.models[name] = copy.deepcopy(self.models["shared"])
            self.opts[name] = torch.optim.AdamW(self.models[name].parameters(), lr=self.recipe.dit_lr, **_ADAM)
            self.opts[name].load_state_dict(self.opts["shared"].state_dict())
            self.emas[name] = copy.deepcopy(self.emas["shared"])
        for d in (self.models, self.opts, self.emas):
            del d["shared"]

    def sigma_range(self, name: str) -> tuple[float, float]:
        """The [lo, hi) σ range model ``name`` trains on."""
        boundary = self.recipe.boundary
        return {"shared": (0.0, 1.0), "high": (boundary, 1.0), "low": (0.0, boundary)}[name]

    def train_step(self, step: int, frac: float, lr_scale: float) -> None:
        if "shared" in self.models and frac >= self.recipe.shared_fraction:
            self.fork()
        # after the fork the experts alternate steps
        name = "shared" if "shared" in self.models else ("high" if step % 2 == 0 else "low")
        model, opt = self.models[name], self.opts[name]
        for g in opt.param_groups:
            g["lr"] = self.recipe.dit_lr * lr_scale
        for g in self.t5_opt.param_groups:
            g["lr"] = self.recipe.t5_lr * lr_scale
        loss = self.batch_loss(name, step)
        optimiser_step(loss, [opt, self.t5_opt], [*model.parameters(), *self.t5.parameters()])
        self.emas[name].update(model)
        if not self.frozen_t5:  # an EMA step on unchanged weights could still move them by rounding
            self.t5_ema.update(self.t5)
        self.recent[name] = [*self.recent.get(name, []), loss.item()][-50:]

    def batch_loss(self, name: str, step: int) -> torch.Tensor:
        """The flow-matching loss of model ``name`` on step ``step``'s batch (all draws from its generator)."""
        recipe, latents = self.recipe, self.cache["latents"]
        gen = step_generator(self.seed, 4, step)
        idx = torch.randint(latents.shape[0], (recipe.dit_batch,), generator=gen)
        captions = pick_captions(gen, self.cache, idx, recipe)
        sigma = sample_sigmas(gen, recipe.dit_batch, recipe.shift, *self.sigma_range(name),
                              uniform=name == "low" and recipe.low_expert_uniform_sigma)
        ctx = encode_captions(self.t5, self.tokenizer, captions, recipe.text_len, self.device)
        weight = self.weights[idx].to(self.device) if self.weights is not None else None
        return flow_matching_loss(self.models[name], latents[idx].to(self.device), sigma, ctx, gen, weight)

    def postfix(self) -> dict[str, str]:
        return {k: f"{sum(v) / len(v):.4f}" for k, v in self.recent.items()}

    def log_rows(self, step: int, lr_scale: float) -> list[dict]:
        # One row per model trained lately: the experts alternate, so logging only the current one
        # would drop whichever trains on the other parity.
        return [dict(stage="dit", expert=key, step=step, loss=sum(vals[-5:]) / len(vals[-5:]),
                     lr=self.recipe.dit_lr * lr_scale)
                for key, vals in self.recent.items() if key in self.models]

    def state_dict(self) -> dict:
        return {"models": {k: m.state_dict() for k, m in self.models.items()},
                "opts": {k: o.state_dict() for k, o in self.opts.items()},
                "emas": {k: e.state_dict() for k, e in self.emas.items()},
                "t5": self.t5.state_dict(), "t5_opt": self.t5_opt.state_dict(), "t5_ema": self.t5_ema.state_dict(),
                "recent": self.recent}

    def load_state_dict(self, state: dict) -> None:
        if "shared" not in state["models"]:
            self.fork()
        for name in self.models:
            self.models[name].load_state_dict(state["models"][name])
            self.opts[name].load_state_dict(state["opts"][name])
            self.emas[name].load_state_dict(state["emas"][name])
        self.t5.load_state_dict(state["t5"])
        self.t5_opt.load_state_dict(state["t5_opt"])
        self.t5_ema.load_state_dict(state["t5_ema"])
        self.recent = state.get("recent", {})  # final losses survive a resume that has no steps left

    def ema_models(self) -> tuple[nn.Module, tuple[nn.Module, nn.Module]]:
        """EMA copies of the text encoder and of the (high, low) experts, in eval mode."""
        t5 = self.t5_ema.copy_to(copy.deepcopy(self.t5)).eval()
        if "shared" in self.models:  # stopped before the fork: both experts are the shared model
            shared = self.emas["shared"].copy_to(copy.deepcopy(self.models["shared"])).eval()
            return t5, (shared, shared)
        return t5, tuple(self.emas[k].copy_to(copy.deepcopy(self.models[k])).eval() for k in ("high", "low"))


def train_dit(recipe: DemoRecipe, cache: dict, tok_dir: Path, work: Path, seed: int, device: torch.device,
              max_seconds: float, resume: bool, log: Logger, progress: bool = True,
              ckpt_seconds: float = 120.0, stop_at: int | None = None) -> dict:
    """Train the DiT (shared, then forked into high/low experts) against the umT5 encoder.

    Returns the EMA text encoder and experts plus step count, seconds and final losses; checkpoints
    to ``work/dit_ckpt.pt``. ``stop_at`` ends the call after that many steps as an interruption would.
    """
    from ..model import WanDiT
    from ..text import Tokenizer, UMT5Encoder

    # The encoder is built before the DiT: both draw their init from this seed, in this order.
    torch.manual_seed(seed)
    tokenizer = Tokenizer.from_folder(tok_dir, text_len=recipe.text_len)
    t5 = UMT5Encoder(recipe.t5_config(tokenizer.vocab_size)).to(device)
    shared = WanDiT(recipe.dit_config()).init_weights().to(device)
    stage = DiTStage(recipe, cache, tokenizer, t5, shared, seed, device)
    steps, seconds = run_stage(stage, work / "dit_ckpt.pt", recipe.dit_steps, recipe.warmup, log=log,
                               max_seconds=max_seconds, resume=resume, device=device, progress=progress,
                               ckpt_seconds=ckpt_seconds, stop_at=stop_at)
    t5_out, experts = stage.ema_models()
    final = {k: sum(v) / len(v) for k, v in stage.recent.items()}
    return {"t5": t5_out, "experts": experts, "step": steps, "elapsed": seconds, "final_loss": final}
