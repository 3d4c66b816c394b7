"""The S2V-14B transformer (official ``WanModel_S2V``) on batched tensors, with the official keys.

It is the Wan DiT (:class:`wanx.model.dit.WanDiT`: same embeddings, blocks, attention and head,
same precision rules) plus what speech-to-video adds. The differences, all explicit below:

- the sequence is ``[video | reference image | motion]`` tokens; pose latents are added to the
  video tokens (``cond_encoder``) and a learned embedding marks each segment (``trainable_cond_mask``);
- positions come from :mod:`wanx.model.s2v_motion` (reference at frame 30, motion at negative frames);
- ``zero_timestep``: the video tokens are modulated with t and the reference/motion tokens with
  t = 0, so each block modulates two segments (:func:`s2v_block`) instead of one;
- after the blocks in ``audio_inject_layers`` the video tokens cross-attend to their frame's audio
  tokens (:class:`wanx.model.s2v_audio.AudioInjector`);
- the head sees the video tokens only.

Axis letters: B batch, T latent frames, h/w latent rows/columns, L tokens, N0 video tokens, D width.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from ..configs import S2VConfig
from .dit import Block, WanDiT, gated_add, modulate
from .s2v_audio import AudioInjector, CausalAudioEncoder
from .s2v_motion import (FramePackMotioner, motion_positions, position_table, reference_positions,
                         video_positions)

MASK_VIDEO, MASK_REFERENCE, MASK_MOTION = 0, 1, 2  # rows of trainable_cond_mask


def check_s2v_config(cfg: S2VConfig) -> None:
    """Only the released S2V structure is implemented; anything else is refused by name."""
    problems = []
    if cfg.enable_motioner or not cfg.enable_framepack:
        problems.append("the motion context must be the frame packer (enable_framepack=True, "
                        "enable_motioner=False)")
    if not cfg.enable_adain or cfg.adain_mode != "attn_norm":
        problems.append("audio injection must use the adaptive norm as query (enable_adain=True, "
                        "adain_mode='attn_norm')")
    if not cfg.add_last_motion and cfg.framepack_drop_mode == "drop":
        problems.append("add_last_motion=False needs framepack_drop_mode='padd'")
    if any(not 0 <= i < cfg.num_layers for i in cfg.audio_inject_layers):
        problems.append(f"audio_inject_layers {cfg.audio_inject_layers} name blocks outside 0..{cfg.num_layers - 1}")
    if problems:
        raise ValueError("unsupported S2V config: " + "; ".join(problems))


def _segments(x: torch.Tensor, n0: int) -> tuple[torch.Tensor, torch.Tensor]:
    return x[:, :n0], x[:, n0:]


def seg_modulate(normed: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, n0: int) -> torch.Tensor:
    """:func:`modulate` with ``shift/scale [B, 2, D]``: row 0 for the first ``n0`` tokens, row 1 after."""
    a, b = _segments(normed, n0)
    return torch.cat([modulate(a, shift[:, :1], scale[:, :1]), modulate(b, shift[:, 1:], scale[:, 1:])], dim=1)


def seg_gated_add(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, n0: int) -> torch.Tensor:
    """:func:`gated_add` with ``gate [B, 2, D]`` split at ``n0`` as in :func:`seg_modulate`."""
    (xa, xb), (ya, yb) = _segments(x, n0), _segments(y, n0)
    return torch.cat([gated_add(xa, ya, gate[:, :1]), gated_add(xb, yb, gate[:, 1:])], dim=1)


def s2v_block(block: Block, x: torch.Tensor, e0: torch.Tensor, n0: int, context: torch.Tensor,
              rope: torch.Tensor, ctx_bias: torch.Tensor | None) -> torch.Tensor:
    """A Wan :class:`Block` with two modulation segments (official ``WanS2VAttentionBlock``).

    ``e0 [B, 2, 6, D]`` fp32: row 0 modulates tokens ``[0, n0)``, row 1 the rest. Everything else is
    :meth:`Block.forward` (same modules, same precision).
    """
    # parity: modulation in fp32, per segment; the official slices, modulates and concatenates.
    mods = (block.modulation.unsqueeze(0) + e0).unbind(2)  # 6 x [B, 2, D]
    shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = mods
    h = seg_modulate(block.norm1(x), shift_sa, scale_sa, n0)
    x = seg_gated_add(x, block.self_attn(h, rope=rope), gate_sa, n0)
    x = x + block.cross_attn(block.norm3(x), context=context, bias=ctx_bias)
    h = seg_modulate(block.norm2(x), shift_ff, scale_ff, n0)
    return seg_gated_add(x, block.ffn(h.to(block.ffn[0].weight.dtype)), gate_ff, n0)


class WanS2VDiT(WanDiT):
    """The S2V transformer with the official ``WanModel_S2V`` state-dict keys."""

    def __init__(self, cfg: S2VConfig):
        check_s2v_config(cfg)
        super().__init__(cfg)
        dim = cfg.dim
        if cfg.cond_dim > 0:
            self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        # sic: the official attribute name, kept for the state-dict keys.
        self.casual_audio_encoder = CausalAudioEncoder(cfg.audio_dim, dim, cfg.num_audio_token, need_global=True)
        self.audio_injector = AudioInjector(dim, cfg.num_heads, cfg.audio_inject_layers, cfg.eps)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.frame_packer = FramePackMotioner(dim, z_dim=cfg.in_dim)
        self._positions: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        super().reset_buffers(device)
        self._positions.clear()

    def compile_blocks(self, **compile_kwargs) -> "WanS2VDiT":
        raise NotImplementedError("S2V runs its own block loop (two modulation segments, audio injection); "
                                  "compiling its blocks is not supported yet")

    def encode_audio(self, audio: torch.Tensor, motion_frames: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``audio [B, 25, C, F]`` -> per latent frame of the clip: tokens ``[B, T, K, D]``, global ``[B, T, 1, D]``.

        The first frame is repeated ``motion_frames[0]`` times in front (the motion context's time),
        encoded causally, and the first ``motion_frames[1]`` latent steps are dropped again.
        """
        pixel, latent = motion_frames
        audio = torch.cat([audio[..., :1].expand(*audio.shape[:-1], pixel), audio], dim=-1)  # [B, 25, C, F+m]
        tokens, glob = self.casual_audio_encoder(audio.to(self.dtype))
        return tokens[:, latent:], glob[:, latent:]

    def position_table(self, grid: tuple[int, int, int], with_motion: bool, device) -> torch.Tensor:
        """complex64 ``[L, 1, D/2]`` RoPE table of ``[video | reference | motion?]`` (cached per shape)."""
        key = (tuple(grid), with_motion, str(torch.device(device)))
        table = self._positions.get(key)
        if table is None:
            _, h, w = grid
            blocks = [video_positions(grid), reference_positions(h, w)]
            blocks += motion_positions(h, w) if with_motion else []
            table = position_table(blocks, self.cfg.head_dim).to(device)
            self._positions[key] = table
            while len(self._positions) > 8:
                self._positions.popitem(last=False)
        return table

    def embed_time_s2v(self, t: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``t [B]`` -> head embedding ``e [B, 1, D]`` and block modulation ``e0 [B, 2, 6, D]`` (fp32).

        With ``zero_timestep`` row 1 of ``e0`` (reference and motion tokens) is t = 0's; the two are
        embedded together, as the official does with ``cat([t, 0])``.
        """
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        if not self.cfg.zero_timestep:
            e, e0 = self.embed_time(t, batch, 1)  # [B, 1, D], [B, 1, 6, D]
            return e, e0.expand(batch, 2, 6, self.cfg.dim)
        e, e0 = self.embed_time(torch.cat([t, t.new_zeros(1)]), batch + 1, 1)  # [B+1, 1, D], [B+1, 1, 6, D]
        e0 = torch.cat([e0[:batch], e0[batch:].expand(batch, 1, 6, self.cfg.dim)], dim=1)  # [B, 2, 6, D]
        return e[:batch], e0

    def assemble(self, x: torch.Tensor, ref_latents: torch.Tensor, motion_latents: torch.Tensor,
                 cond_states: torch.Tensor | None, drop_motion_frames: bool,
                 add_last_motion: int) -> tuple[torch.Tensor, tuple[int, int, int], int]:
        """The token sequence ``[B, L, D]`` (weight dtype), the video token grid, and N0 (video tokens).

        ``cond_states`` None means no pose: the official then encodes an all-zero latent, which is
        exactly the ``cond_encoder`` bias.
        """
        video, grid = self.patchify(x)  # [B, N0, D]
        if hasattr(self, "cond_encoder"):
            if cond_states is None:
                video = video + self.cond_encoder.bias.to(video.dtype)
            else:
                pose = self.cond_encoder(cond_states.to(self.dtype))  # [B, D, T, h', w']
                if tuple(pose.shape[2:]) != grid:
                    raise ValueError(f"pose latent grid {tuple(pose.shape[2:])} does not match the video's {grid}")
                video = video + pose.flatten(2).transpose(1, 2)
        b = video.shape[0]
        ref = self.patch_embedding(ref_latents.to(self.dtype).expand(b, -1, -1, -1, -1))  # [B, D, 1, h', w']
        parts = [video, ref.flatten(2).transpose(1, 2)]  # + [B, h'w', D]
        if not drop_motion_frames:
            parts.append(self.frame_packer(motion_latents.expand(b, -1, -1, -1, -1), add_last_motion))
        n0, n_ref = video.shape[1], parts[1].shape[1]
        tokens = torch.cat(parts, dim=1)  # [B, L, D]
        # parity: the segment embeddings are added (as the official embedding lookup) in the tokens' dtype.
        mask = self.trainable_cond_mask.weight.to(tokens.dtype)
        tokens[:, :n0] += mask[MASK_VIDEO]
        tokens[:, n0:n0 + n_ref] += mask[MASK_REFERENCE]
        tokens[:, n0 + n_ref:] += mask[MASK_MOTION]
        return tokens, grid, n0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, *, ref_latents: torch.Tensor,
                motion_latents: torch.Tensor, audio_input: torch.Tensor, cond_states: torch.Tensor | None = None,
                motion_frames: tuple[int, int] = (73, 19), drop_motion_frames: bool = False,
                add_last_motion: int = 2, context_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the flow velocity of ``x [B, 16, T, h, w]``: float32 ``[B, out_dim, T, h, w]``.

        ``ref_latents [1|B, 16, 1, h, w]`` (reference image), ``motion_latents [1|B, 16, Tm, h, w]``
        (the encoded motion-context frames), ``audio_input [B, 25, C, 4T]`` (one wav2vec2 feature
        per video frame of the clip), ``cond_states [B, 16, T, h, w]`` (pose latents) or None,
        ``motion_frames`` = (pixel, latent) motion-context length, ``drop_motion_frames``: no
        motion tokens (the first clip). ``context [B, L_ctx, text_dim]`` as for :class:`WanDiT`.
        """
        b = x.shape[0]
        audio, audio_global = self.encode_audio(audio_input.to(x.device), tuple(motion_frames))  # [B, T, K, D]
        if audio.shape[0] != b:
            raise ValueError(f"audio_input has batch {audio_input.shape[0]}, x has {b}")
        add_last = int(self.cfg.add_last_motion) * int(add_last_motion)
        tokens, grid, n0 = self.assemble(x, ref_latents.to(x.device), motion_latents.to(x.device),
                                         None if cond_states is None else cond_states.to(x.device),
                                         drop_motion_frames, add_last)
        if audio.shape[1] != grid[0]:
            raise ValueError(f"audio gives {audio.shape[1]} latent frames, the video has {grid[0]}")
        e, e0 = self.embed_time_s2v(torch.as_tensor(t, device=x.device), b)
        context, ctx_bias = self.embed_text(context.to(x.device), compact=self._can_compact_text(tokens),
                                            lengths=context_lens)
        rope = self.position_table(grid, not drop_motion_frames, x.device)  # [L, 1, D/2]
        for i, blk in enumerate(self.blocks):
            tokens = s2v_block(blk, tokens, e0, n0, context, rope, ctx_bias)  # [B, L, D] fp32
            tokens = self.audio_injector(i, tokens, n0, audio, audio_global)
        with torch.autocast(x.device.type, enabled=False):
            out = self.head(tokens[:, :n0], e)  # [B, N0, p*out_dim]
        return self.unpatchify(out, grid).float()
