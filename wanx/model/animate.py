"""Animate-14B's transformer (official ``WanAnimateModel``) on batched tensors, with the official keys.

It is the Wan DiT (:mod:`wanx.model.dit`: the same self-attention, FFN, modulation, RoPE and
output head, with one timestep per sample) plus four differences, each a separate piece here:

1. ``img_emb`` projects the CLIP features of the reference image (257 tokens) and prepends them to
   the text; each block's cross-attention attends to them with its own ``k_img``/``v_img``
   (:class:`ImageCrossAttention`) and adds the two results before the output projection.
2. ``pose_patch_embedding`` embeds the pose-video latent and adds it to the tokens of latent
   frames 1..T-1 (frame 0 is the reference image).
3. The face video goes through the LIA ``motion_encoder`` and the ``face_encoder``
   (:mod:`wanx.model.animate_face`); one face block (``face_adapter``) after every fifth DiT block
   adds, to each latent frame's tokens, attention over that frame's motion tokens.
4. There is no per-token timestep (TI2V's): ``t`` is ``[B]``.

Axis letters: B batch, C channels, T latent frames, H/W latent size, L tokens, F face frames.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..configs import AnimateConfig
from .animate_face import FACE_BATCH, FaceAdapter, FaceEncoder, MotionEncoder
from .attention import attention
from .dit import Attention, Block, LayerNorm, RMSNorm, WanDiT


class ImageCrossAttention(Attention):
    """Cross-attention to ``[image tokens | text tokens]``: one query, two key/value sets, outputs summed."""

    def __init__(self, dim: int, num_heads: int, image_tokens: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__(dim, num_heads, qk_norm, eps)
        self.image_tokens = image_tokens
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, rope: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, L, dim]``, ``context [B, n_img + Lk, dim]``; ``bias`` applies to the text keys only."""
        dtype = self.q.weight.dtype
        x, context = x.to(dtype), context.to(dtype)
        img, text = context[:, :self.image_tokens], context[:, self.image_tokens:]
        b, n, d = x.shape[0], self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, -1, n, d)  # [B, L, H, D]
        k = self.norm_k(self.k(text)).view(b, -1, n, d)  # [B, Lk, H, D]
        v = self.v(text).view(b, -1, n, d)
        k_img = self.norm_k_img(self.k_img(img)).view(b, -1, n, d)  # [B, n_img, H, D]
        v_img = self.v_img(img).view(b, -1, n, d)
        out = attention(q, k, v, bias=bias) + attention(q, k_img, v_img)  # [B, L, H, D]
        return self.o(out.flatten(2))  # [B, L, dim]


class AnimateBlock(Block):
    """The Wan block with :class:`ImageCrossAttention` in place of the text-only cross-attention."""

    def __init__(self, cfg: AnimateConfig):
        super().__init__(cfg)
        self.cross_attn = ImageCrossAttention(cfg.dim, cfg.num_heads, cfg.image_tokens, cfg.qk_norm, cfg.eps)


class ImageProjection(nn.Module):
    """CLIP features -> DiT width: LayerNorm, Linear, exact GELU, Linear, LayerNorm (official ``MLPProj``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # parity: torch.nn.LayerNorm defaults in the official (eps 1e-5, affine), computed in fp32.
        self.proj = nn.Sequential(LayerNorm(in_dim, 1e-5, affine=True), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), LayerNorm(out_dim, 1e-5, affine=True))

    def forward(self, clip_fea: torch.Tensor) -> torch.Tensor:
        """``clip_fea [B, n_img, in_dim]`` -> ``[B, n_img, out_dim]`` in the weight dtype."""
        dtype = self.proj[1].weight.dtype
        h = self.proj[0](clip_fea.float()).to(dtype)
        h = self.proj[3](self.proj[2](self.proj[1](h)))
        return self.proj[4](h)


class WanAnimateDiT(WanDiT):
    """Animate-14B's transformer with the official state-dict keys (see the module docstring)."""

    def __init__(self, cfg: AnimateConfig):
        super().__init__(cfg)
        # The base built plain blocks; replace them (no weights are shared, the keys only grow).
        self.blocks = nn.ModuleList(AnimateBlock(cfg) for _ in range(cfg.num_layers))
        self.pose_patch_embedding = nn.Conv3d(cfg.latent_dim, cfg.dim, kernel_size=cfg.patch_size,
                                              stride=cfg.patch_size)
        self.img_emb = ImageProjection(cfg.image_dim, cfg.dim)
        self.motion_encoder = MotionEncoder(cfg.face_size, out_dim=cfg.motion_encoder_dim,
                                            motion_dim=cfg.motion_dim)
        self.face_encoder = FaceEncoder(cfg.motion_encoder_dim, cfg.dim, cfg.face_hidden_dim, cfg.face_heads)
        self.face_adapter = FaceAdapter(cfg.dim, cfg.num_heads, cfg.num_layers // cfg.face_every, cfg.eps)

    @torch.no_grad()
    def init_weights(self) -> "WanAnimateDiT":
        """Not provided: Animate is only ever loaded from its checkpoint."""
        raise NotImplementedError("WanAnimateDiT has no training initialisation; load a checkpoint")

    def encode_face(self, face_pixels: torch.Tensor) -> torch.Tensor:
        """``face_pixels [B, 3, F, S, S]`` in [-1, 1] -> motion tokens ``[B, T, N, dim]``, T = ceil(F/4) + 1.

        Depends on the face video only, so a pipeline computes it once per segment, not per step.
        """
        b, _, f = face_pixels.shape[:3]
        frames = face_pixels.transpose(1, 2).flatten(0, 1)  # [B*F, 3, S, S]
        dtype = self.motion_encoder.enc.fc[0].weight.dtype
        motion = torch.cat([self.motion_encoder(chunk.to(dtype)) for chunk in frames.split(FACE_BATCH)])
        tokens = self.face_encoder(motion.to(dtype).view(b, f, -1))  # [B, T-1, N, dim]
        # The reference latent frame (frame 0) gets an all-zero set of motion tokens.
        return torch.cat([torch.zeros_like(tokens[:, :1]), tokens], dim=1)  # [B, T, N, dim]

    def embed_video(self, x: torch.Tensor, pose_latents: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch-embed ``x [B, in_dim, T, H, W]`` and add the pose latent ``[B, C, T-1, H, W]`` to frames 1..T-1."""
        if pose_latents.shape[2] + 1 != x.shape[2]:
            raise ValueError(f"pose latents have {pose_latents.shape[2]} frames; the video latent has "
                             f"{x.shape[2]} (one reference frame + one per pose frame)")
        tokens = self.patch_embedding(x.to(self.dtype))  # [B, dim, T', H', W']
        pose = self.pose_patch_embedding(pose_latents.to(self.dtype))  # [B, dim, T'-1, H', W']
        tokens = torch.cat([tokens[:, :, :1], tokens[:, :, 1:] + pose], dim=2)
        grid = tuple(tokens.shape[2:])
        return tokens.flatten(2).transpose(1, 2), grid  # [B, L, dim]

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, clip_fea: torch.Tensor,
                y: torch.Tensor, pose_latents: torch.Tensor, face_pixels: torch.Tensor | None = None,
                motion_vec: torch.Tensor | None = None,
                context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity for ``x [B, 16, T, H, W]``: float32 ``[B, out_dim, T, H, W]``.

        ``y [B, 20, T, H, W]``: mask + reference/temporal latents; ``clip_fea [B, 257, 1280]``;
        ``pose_latents [B, 16, T-1, H, W]``; the face either as ``face_pixels [B, 3, F, 512, 512]``
        or already encoded (``motion_vec`` from :meth:`encode_face`).
        """
        if motion_vec is None:
            if face_pixels is None:
                raise ValueError("give face_pixels or motion_vec")
            motion_vec = self.encode_face(face_pixels)
        b = x.shape[0]
        x, grid = self.embed_video(torch.cat([x, y.to(x.dtype)], dim=1), pose_latents)  # [B, L, dim]
        e, e0 = self.embed_time(torch.as_tensor(t, device=x.device), b, x.shape[1])  # [B, 1, dim], [B, 1, 6, dim]
        text, ctx_bias = self.embed_text(context.to(x.device), compact=self._can_compact_text(x),
                                         lengths=context_lens)
        image = self.img_emb(clip_fea.to(x.device)).expand(b, -1, -1)  # [B, n_img, dim]
        context = torch.cat([image.to(text.dtype), text], dim=1)  # [B, n_img + Lk, dim]
        motion_vec = motion_vec.to(x.device).expand(b, -1, -1, -1)
        rope = self.rope(grid, x.device)
        every = self.cfg.face_every
        for i, block in enumerate(self.blocks):
            x = block(x, e0, context, rope, ctx_bias)  # [B, L, dim] fp32
            if i % every == 0:
                x = x + self.face_adapter.fuser_blocks[i // every](x, motion_vec)
        with torch.autocast(x.device.type, enabled=False):
            x = self.head(x, e)  # [B, L, p*out_dim]
        return self.unpatchify(x, grid).float()
