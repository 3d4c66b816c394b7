"""wav2vec 2.0 in plain torch (the "stable layer norm" variant of S2V's wav2vec2-large-xlsr-53).

Same parameter names as transformers' ``Wav2Vec2Model``, so its weights load unchanged (see
:mod:`wanx.loading.s2v_wav2vec2`). It returns all hidden states the way transformers 4.x does,
which is what the official S2V code was run with: the input of every layer, then the final
LayerNorm of the last one. transformers 5.x returns the last layer's output *without* that norm
(so its 25th state differs); implementing the model here keeps wanx independent of that.

Axis letters: B batch, N samples, T frames (50 per second), C channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class Wav2Vec2Config:
    """The fields of a transformers ``Wav2Vec2Config`` that shape the model (transformers' defaults)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    do_stable_layer_norm: bool = False
    hidden_act: str = "gelu"
    feat_extract_activation: str = "gelu"
    extras: dict = field(default_factory=dict, compare=False)  # unsupported options found in the file

    @classmethod
    def from_hf_json(cls, d: Mapping[str, Any]) -> "Wav2Vec2Config":
        """From a transformers config.json; other keys are ignored, except options that change the model."""
        names = {f.name for f in fields(cls)} - {"extras"}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        extras = {k: d[k] for k in ("add_adapter", "adapter_attn_dim", "use_weighted_layer_sum") if d.get(k)}
        return cls(**kw, extras=extras)

    def check(self) -> None:
        """Only the variant S2V uses is implemented; anything else is refused by name."""
        problems = []
        if self.feat_extract_norm != "layer" or not self.do_stable_layer_norm:
            problems.append(f"feat_extract_norm={self.feat_extract_norm!r}, do_stable_layer_norm="
                            f"{self.do_stable_layer_norm} (wanx implements 'layer' / True, as wav2vec2-large-xlsr-53)")
        if self.hidden_act != "gelu" or self.feat_extract_activation != "gelu":
            problems.append("activations other than gelu")
        if self.extras:
            problems.append(f"options {sorted(self.extras)}")
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            problems.append("conv_dim, conv_kernel and conv_stride of different lengths")
        if problems:
            raise ValueError("unsupported wav2vec2 model: " + "; ".join(problems))


class ConvLayer(nn.Module):
    """Conv1d, LayerNorm over channels, GELU (transformers ``Wav2Vec2LayerNormConvLayer``)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.layer_norm = nn.LayerNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, T]`` -> ``[B, C', T']``."""
        return F.gelu(self.layer_norm(self.conv(x).transpose(1, 2)).transpose(1, 2))


class FeatureExtractor(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        dims = (1, *cfg.conv_dim)
        self.conv_layers = nn.ModuleList(ConvLayer(dims[i], dims[i + 1], k, s, cfg.conv_bias)
                                         for i, (k, s) in enumerate(zip(cfg.conv_kernel, cfg.conv_stride)))

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` -> ``[B, T, C_conv]``."""
        x = samples[:, None]  # [B, 1, N]
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)


class FeatureProjection(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.conv_dim[-1], eps=cfg.layer_norm_eps)
        self.projection = nn.Linear(cfg.conv_dim[-1], cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.layer_norm(x))


class WeightNormConv(nn.Module):
    """Conv1d whose weight is ``g * v / |v|`` with the norm taken per kernel tap (``weight_norm(dim=2)``)."""

    def __init__(self, channels: int, kernel: int, groups: int):
        super().__init__()
        self.padding, self.groups = kernel // 2, groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True))
        return F.conv1d(x, weight, self.bias, padding=self.padding, groups=self.groups)


class PositionalConvEmbedding(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        k = cfg.num_conv_pos_embeddings
        self.conv = WeightNormConv(cfg.hidden_size, k, cfg.num_conv_pos_embedding_groups)
        self.remove = 1 if k % 2 == 0 else 0  # "same" padding of an even kernel leaves one extra frame

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, C]`` -> ``[B, T, C]``."""
        y = self.conv(x.transpose(1, 2))  # [B, C, T + remove]
        if self.remove:
            y = y[:, :, :-self.remove]
        return F.gelu(y).transpose(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, C/H], scale 1/sqrt(C/H)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


class EncoderLayer(nn.Module):
    """Pre-LN transformer layer (transformers ``Wav2Vec2EncoderLayerStableLayerNorm``)."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_attention_heads)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feed_forward = FeedForward(cfg.hidden_size, cfg.intermediate_size)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layer_norm(x))
        return x + self.feed_forward(self.final_layer_norm(x))


class Encoder(nn.Module):
    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        self.pos_conv_embed = PositionalConvEmbedding(cfg)
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[B, T, C]`` -> the ``num_hidden_layers + 1`` hidden states, each ``[B, T, C]``."""
        x = x + self.pos_conv_embed(x)
        states = []
        for layer in self.layers:
            states.append(x)  # the input of each layer, as transformers 4.x collects them
            x = layer(x)
        # parity: the last state is the final LayerNorm's output (transformers <= 4.x, the official pin).
        states.append(self.layer_norm(x))
        return states


class Wav2Vec2(nn.Module):
    """``samples [B, N]`` (16 kHz, utterance-normalised) -> all hidden states ``[L + 1, B, T, C]``."""

    def __init__(self, cfg: Wav2Vec2Config):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_projection = FeatureProjection(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        x = self.feature_projection(self.feature_extractor(samples))  # [B, T, C]
        return torch.stack(self.encoder(x))  # [L + 1, B, T, C]

    def num_frames(self, num_samples: int) -> int:
        """Output frames for ``num_samples`` input samples (the conv stack's arithmetic)."""
        return conv_frames(num_samples, self.cfg.conv_kernel, self.cfg.conv_stride)


def conv_frames(num_samples: int, kernels=(10, 3, 3, 3, 3, 2, 2), strides=(5, 2, 2, 2, 2, 2, 2)) -> int:
    """Frames out of an unpadded conv stack (the wav2vec2 default: 400-sample window, 320-sample hop)."""
    n = num_samples
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1 if n >= k else 0
    return max(n, 0)
