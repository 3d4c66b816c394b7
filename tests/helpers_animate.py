"""Shared pieces of the Animate tests: the official modules (imported by file path), random weights, inputs."""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from wanx.configs import AnimateConfig
from wanx.model.attention import attention

OFFICIAL_SRC_DEFAULT = Path(__file__).resolve().parents[1] / ".venv" / "reference" / "wan"
_MAIN_SRC = Path("/work/main/.venv/reference/wan")
PKG = "_wan_official_animate"


def official_src() -> Path:
    env = os.environ.get("WANX_OFFICIAL_SRC")
    if env:
        return Path(env)
    return OFFICIAL_SRC_DEFAULT if OFFICIAL_SRC_DEFAULT.is_dir() else _MAIN_SRC


def _need(path: Path, *modules: str) -> None:
    if not path.is_file():
        message = f"official Wan source not found at {path} (`bash scripts/setup.sh all` fetches it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    for name in modules:
        pytest.importorskip(name)


def official_module(name: str):
    """``wan/<name>.py`` (dotted, e.g. ``modules.animate.face_blocks``) without running any package __init__."""
    root = official_src()
    _need(root / (name.replace(".", "/") + ".py"), "einops", "diffusers")
    for pkg in ("", ".modules", ".modules.animate", ".distributed", ".utils"):
        full = PKG + pkg
        if full not in sys.modules:
            mod = types.ModuleType(full)
            mod.__path__ = [str(root / pkg[1:].replace(".", "/"))] if pkg else [str(root)]
            sys.modules[full] = mod
    return importlib.import_module(f"{PKG}.{name}")


def _key_bias(k_lens, num_keys):
    if k_lens is None:
        return None
    keep = torch.arange(num_keys)[None, :] < k_lens[:, None]
    return torch.where(keep, 0.0, float("-inf"))[:, None, None, :]


def patch_official_attention(monkeypatch) -> None:
    """The official code calls CUDA flash-attn; give it wanx's attention (k_lens as a -inf key bias)."""
    model = official_module("modules.animate.model_animate")
    faces = official_module("modules.animate.face_blocks")
    monkeypatch.setattr(model, "flash_attention",
                        lambda q, k, v, k_lens=None, **kw: attention(q, k, v, bias=_key_bias(k_lens, k.shape[1])))
    monkeypatch.setattr(faces, "flash_attn_func", lambda q, k, v, **kw: attention(q, k, v))


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that keep every path alive: LIA weights N(0, 1) as its own init, the rest small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.startswith("motion_encoder") and "bias" not in name:
                p.copy_(noise)
            else:
                p.copy_(0.05 * noise)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def tiny_inputs(cfg: AnimateConfig, frames: int = 5, h: int = 4, w: int = 6, text: int = 7, seed: int = 1):
    """(x, t, context, clip_fea, y, pose_latents, face_pixels) for one sample of a ``frames``-frame segment."""
    gen = torch.Generator().manual_seed(seed)
    lat_t = (frames - 1) // 4 + 1  # pose latents; the video latent has one more (the reference)
    c = cfg.latent_dim
    x = torch.randn(1, c, lat_t + 1, h, w, generator=gen)
    y = torch.randn(1, cfg.in_dim - c, lat_t + 1, h, w, generator=gen)
    pose = torch.randn(1, c, lat_t, h, w, generator=gen)
    ctx = torch.randn(1, text, cfg.text_dim, generator=gen)
    clip = torch.randn(1, cfg.image_tokens, cfg.image_dim, generator=gen)
    face = torch.rand(1, 3, frames, cfg.face_size, cfg.face_size, generator=gen) * 2 - 1
    return x, torch.tensor([937.0]), ctx, clip, y, pose, face


def official_twin(cfg: AnimateConfig, monkeypatch):
    """The official WanAnimateModel at ``cfg``'s size with random weights (its LIA encoder rebuilt at face_size)."""
    patch_official_attention(monkeypatch)
    model = official_module("modules.animate.model_animate")
    motion = official_module("modules.animate.motion_encoder")
    kw = {k: getattr(cfg, k) for k in ("patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
                                       "out_dim", "num_heads", "num_layers", "eps", "motion_encoder_dim")}
    torch.manual_seed(0)
    ref = model.WanAnimateModel(**kw)
    if cfg.image_dim != 1280:  # MLPProj(1280, dim) is hard-coded; the tiny model has narrower CLIP features
        ref.img_emb = model.MLPProj(cfg.image_dim, cfg.dim)
    ref.motion_encoder = motion.Generator(size=cfg.face_size, style_dim=512, motion_dim=cfg.motion_dim)
    ref.eval().requires_grad_(False)
    randomize(ref)
    return ref


def run_official(ref, x, t, ctx, clip, y, pose, face):
    """The official forward on our batched inputs (lists of per-sample tensors, seq_len = the tokens)."""
    p = ref.patch_size
    seq_len = (x.shape[2] // p[0]) * (x.shape[3] // p[1]) * (x.shape[4] // p[2])
    return ref([x[0]], t=t, clip_fea=clip, context=[ctx[0]], seq_len=seq_len, y=[y[0]],
               pose_latents=pose, face_pixel_values=face)[0]
