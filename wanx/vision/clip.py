"""The CLIP visual tower of ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (ViT-H/14).

Only what Animate-14B uses is built: patch + class-token + position embeddings, the pre-norm,
and the first ``use_layers`` (31 of 32) pre-norm transformer blocks; the output is their hidden
state (no post-norm, no pooling head). Parameter names are the official ones under ``visual.``.
Axis letters: B batch, L tokens (class token first), H heads, D head width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..configs import CLIPVisionConfig
from ..model.attention import attention
from ..model.dit import LayerNorm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """``images [B, 3, H, W]`` in [-1, 1] -> the CLIP input ``[B, 3, size, size]`` (float32).

    As the official ``CLIPModel.visual``: a bicubic resize of the [-1, 1] tensor to a square
    (no crop: the aspect ratio is squashed), then to [0, 1], then the CLIP mean/std.
    """
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=x.device)[:, None, None]
    return (x - mean) / std


class SelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention (no q/k norm, no RoPE)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.to_qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).unbind(2)  # [B, L, H, D]
        return self.proj(attention(q, k, v).reshape(b, n, d))  # [B, L, dim]


class CLIPBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` with an exact-GELU MLP."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        hidden = int(cfg.dim * cfg.mlp_ratio)
        # parity: the official LayerNorm computes in float32 and casts back to the input dtype.
        self.norm1 = LayerNorm(cfg.dim, cfg.norm_eps, affine=True)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, cfg.norm_eps, affine=True)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVision(nn.Module):
    """``forward(pixels [B, 3, S, S] normalised)`` -> hidden states ``[B, L, dim]`` after ``use_layers`` blocks."""

    def __init__(self, cfg: CLIPVisionConfig | None = None):
        super().__init__()
        cfg = cfg or CLIPVisionConfig()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, cfg.norm_eps, affine=True)
        self.transformer = nn.Sequential(*[CLIPBlock(cfg) for _ in range(cfg.use_layers)])

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if tuple(pixels.shape[-2:]) != (s, s):
            raise ValueError(f"CLIP input must be {s}x{s} (see clip_preprocess), got {tuple(pixels.shape[-2:])}")
        x = self.patch_embedding(pixels.to(self.dtype)).flatten(2).transpose(1, 2)  # [B, L-1, dim]
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)  # [B, L, dim]
        x = self.pre_norm(x + self.pos_embedding)
        return self.transformer(x)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images [B, 3, H, W]`` in [-1, 1] -> features ``[B, L, dim]`` (preprocessing included)."""
        return self(clip_preprocess(images, self.cfg.image_size).to(self.patch_embedding.weight.device))
