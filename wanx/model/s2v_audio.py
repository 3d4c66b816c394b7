"""The S2V transformer's audio path: the causal audio encoder and the audio-injection layers.

Axis letters: B batch, N wav2vec2 layers (25), C channels, F audio frames (one per video frame),
T latent frames (F / 4), K audio tokens per latent frame (num_audio_token + 1), S tokens per
latent frame, D model width. Official names kept for the state-dict keys, including the
misspelled ``casual_audio_encoder`` attribute of the model (see :mod:`wanx.model.s2v`).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import Attention, linear_fp32

AUDIO_NORM_EPS = 1e-6  # the encoder's parameter-free LayerNorms
ADAIN_NORM_EPS = 1e-5  # diffusers AdaLayerNorm's default


class CausalConv1d(nn.Module):
    """Conv1d over time whose left edge is padded by repeating the first frame (no look-ahead)."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.kernel = kernel
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, F]`` -> float32 ``[B, C', ceil(F / stride)]``."""
        x = F.pad(x.float(), (self.kernel - 1, 0), mode="replicate")
        bias = None if self.conv.bias is None else self.conv.bias.float()
        # parity: the official encoder runs inside an fp32 autocast region whatever the weight dtype.
        return F.conv1d(x, self.conv.weight.float(), bias, stride=self.conv.stride)


def _norm_silu(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free LayerNorm over the last axis, then SiLU (fp32)."""
    return F.silu(F.layer_norm(x, (x.shape[-1],), eps=AUDIO_NORM_EPS))


class AudioMotionEncoder(nn.Module):
    """Official ``MotionEncoder_tc``: audio features -> K-1 local tokens (+ a learned padding token)
    per latent frame, and one global token per latent frame for the adaptive norms.

    Time shrinks 4x through two stride-2 causal convs; the local branch runs ``num_heads`` groups of
    ``hidden // 4`` channels through the same convs as the global branch.
    """

    def __init__(self, in_dim: int, hidden: int, num_heads: int, need_global: bool = True):
        super().__init__()
        self.num_heads, self.need_global = num_heads, need_global
        self.conv1_local = CausalConv1d(in_dim, hidden // 4 * num_heads, 3)
        if need_global:
            self.conv1_global = CausalConv1d(in_dim, hidden // 4, 3)
        self.conv2 = CausalConv1d(hidden // 4, hidden // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden // 2, hidden, 3, stride=2)
        if need_global:
            self.final_linear = nn.Linear(hidden, hidden)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden))

    def _tail(self, x: torch.Tensor) -> torch.Tensor:
        """The shared norm/SiLU/conv2/conv3 stack: ``x [B', F, C/4]`` -> ``[B', T, D]`` fp32."""
        x = self.conv2(_norm_silu(x).transpose(1, 2))  # [B', C/2, F/2]
        x = self.conv3(_norm_silu(x.transpose(1, 2)).transpose(1, 2))  # [B', D, T]
        return _norm_silu(x.transpose(1, 2))  # [B', T, D]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, F, C]`` -> (local ``[B, T, K, D]``, global ``[B, T, 1, D]`` or None), float32."""
        b, n = x.shape[0], self.num_heads
        x_bcf = x.transpose(1, 2)  # [B, C, F]
        local = self.conv1_local(x_bcf)  # [B, n*C/4, F]
        local = local.unflatten(1, (n, -1)).permute(0, 1, 3, 2).flatten(0, 1)  # [(B n), F, C/4]
        local = self._tail(local).unflatten(0, (b, n)).transpose(1, 2)  # [B, T, n, D]
        pad = self.padding_tokens.float().expand(b, local.shape[1], 1, -1)  # [B, T, 1, D]
        local = torch.cat([local, pad], dim=2)  # [B, T, K, D]
        if not self.need_global:
            return local, None
        glob = self._tail(self.conv1_global(x_bcf).transpose(1, 2))  # [B, T, D]
        glob = linear_fp32(self.final_linear, glob)
        return local, glob[:, :, None]  # [B, T, 1, D]


class CausalAudioEncoder(nn.Module):
    """Official ``CausalAudioEncoder``: a learned SiLU-weighted average of the wav2vec2 layers, then
    :class:`AudioMotionEncoder`."""

    def __init__(self, audio_dim: int, out_dim: int, num_token: int, need_global: bool, num_layers: int = 25):
        super().__init__()
        self.encoder = AudioMotionEncoder(audio_dim, out_dim, num_token, need_global)
        self.weights = nn.Parameter(torch.full((1, num_layers, 1, 1), 0.01))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``features [B, N, C, F]`` -> (local ``[B, T, K, D]``, global ``[B, T, 1, D]`` or None)."""
        # parity: fp32 (official autocast(float32) region); multiply, divide by the sum, then reduce.
        w = F.silu(self.weights.float())  # [1, N, 1, 1]
        mixed = (features.float() * w / w.sum(dim=1, keepdim=True)).sum(dim=1)  # [B, C, F]
        return self.encoder(mixed.transpose(1, 2))


class AdaLayerNorm(nn.Module):
    """diffusers ``AdaLayerNorm(chunk_dim=1)``: ``LN(x) * (1 + scale) + shift``, (shift, scale) from ``temb``."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """``x [B', S, D]``, ``temb [B', D]`` -> float32 ``[B', S, D]``."""
        dtype = self.linear.weight.dtype
        shift, scale = self.linear(F.silu(temb.float()).to(dtype)).chunk(2, dim=1)  # 2 x [B', D]
        # parity: the norm in fp32 (LayerNorm autocasts up), no affine, eps 1e-5.
        normed = F.layer_norm(x.float(), (x.shape[-1],), eps=ADAIN_NORM_EPS)
        return normed * (1 + scale[:, None]) + shift[:, None]


class AudioInjector(nn.Module):
    """Official ``AudioInjector_WAN`` in its released mode (adaptive norm as the query, ``attn_norm``):
    after block ``layers[i]``, each latent frame's tokens cross-attend to that frame's audio tokens."""

    def __init__(self, dim: int, num_heads: int, layers: Sequence[int], eps: float = 1e-6):
        super().__init__()
        self.slot = {int(layer): i for i, layer in enumerate(layers)}  # block index -> injector index
        self.injector = nn.ModuleList(Attention(dim, num_heads, qk_norm=True, eps=eps) for _ in layers)
        self.injector_adain_layers = nn.ModuleList(AdaLayerNorm(dim) for _ in layers)

    def forward(self, block_index: int, x: torch.Tensor, n0: int, audio: torch.Tensor,
                audio_global: torch.Tensor) -> torch.Tensor:
        """Add the injection after block ``block_index`` to the first ``n0`` tokens of ``x [B, L, D]``.

        ``audio [B, T, K, D]`` and ``audio_global [B, T, 1, D]`` give one set per latent frame; the
        first ``n0`` tokens are T frames of S tokens each.
        """
        i = self.slot.get(block_index)
        if i is None:
            return x
        b, t, k, d = audio.shape
        if n0 % t:
            raise ValueError(f"{n0} video tokens do not split into {t} latent frames of audio")
        frames = x[:, :n0].reshape(b * t, n0 // t, d)  # [(B T), S, D]
        query = self.injector_adain_layers[i](frames, audio_global.reshape(b * t, d))
        out = self.injector[i](query, context=audio.reshape(b * t, k, d))  # [(B T), S, D]
        x = x.clone() if torch.is_grad_enabled() else x
        # parity: the residual is added to the fp32 stream in place of the official slice assignment.
        x[:, :n0] += out.reshape(b, n0, d)
        return x
