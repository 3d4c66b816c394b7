"""Animate-14B's face branch: LIA motion encoder, temporal face encoder, per-frame face adapter.

Axis letters: B batch, F face frames, T latent frames, S tokens per latent frame, N motion tokens
per frame, H heads, D head width. Module paths and parameter names are the official ones
(``motion_encoder.enc.net_app.convs...``, ``face_encoder.conv1_local.conv``,
``face_adapter.fuser_blocks.{i}.linear1_kv``), so official checkpoints load strictly.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .dit import LayerNorm, RMSNorm

BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
# Output channels of the LIA appearance encoder by feature-map size (the official table).
LIA_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}
FACE_BATCH = 8  # face crops per motion-encoder call, as the official (bounds activation memory)


class _Level(nn.Module):
    """A bare level of the official module tree (``enc``, ``net_app``, ``dec``): submodules only."""


class ScaledConv2d(nn.Module):
    """StyleGAN "equalized" conv: the stored weight is multiplied by 1/sqrt(fan_in) at run time."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.scale = 1 / math.sqrt(cin * kernel * kernel)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.to(self.weight.dtype), self.weight * self.scale, self.bias, self.stride, self.padding)


class ScaledLinear(nn.Module):
    """Equalized linear layer (lr_mul 1): ``x @ (W / sqrt(in)).T + b``."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = 1 / math.sqrt(cin)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight * self.scale, self.bias)


class BiasLeakyReLU(nn.Module):
    """``leaky_relu(x + b, 0.2) * sqrt(2)`` with a per-channel bias stored as ``[1, C, 1, 1]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias, 0.2) * math.sqrt(2)


def blur_kernel() -> torch.Tensor:
    """The normalised 4x4 FIR kernel ([1,3,3,1] outer itself, sum 1) stored in official checkpoints."""
    k = torch.tensor(BLUR_TAPS)
    k = k[None, :] * k[:, None]
    return k / k.sum()


class Blur(nn.Module):
    """Depthwise FIR low-pass before a stride-2 conv (anti-aliased downsampling)."""

    def __init__(self, pad: tuple[int, int]):
        super().__init__()
        self.register_buffer("kernel", blur_kernel())  # persistent: official checkpoints carry it
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        p0, p1 = self.pad
        x = F.pad(x, (p0, p1, p0, p1))
        k = self.kernel.flip(0, 1).to(x.dtype).expand(c, 1, *self.kernel.shape)  # true convolution
        return F.conv2d(x, k, groups=c)


def conv_layer(cin: int, cout: int, kernel: int, downsample: bool = False, activate: bool = True) -> nn.Sequential:
    """The official ``ConvLayer``: [blur], equalized conv, [bias + leaky ReLU] (bias lives in the activation)."""
    layers: list[nn.Module] = []
    if downsample:
        p = len(BLUR_TAPS) - 2 + kernel - 1
        layers.append(Blur(((p + 1) // 2, p // 2)))
        layers.append(ScaledConv2d(cin, cout, kernel, stride=2))
    else:
        layers.append(ScaledConv2d(cin, cout, kernel, padding=kernel // 2))
    if activate:
        layers.append(BiasLeakyReLU(cout))
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    """Two 3x3 convs (the second halves the size) plus a blurred 1x1 stride-2 skip, summed / sqrt(2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = conv_layer(cin, cin, 3)
        self.conv2 = conv_layer(cin, cout, 3, downsample=True)
        self.skip = conv_layer(cin, cout, 1, downsample=True, activate=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / math.sqrt(2)


class MotionEncoder(nn.Module):
    """LIA motion encoder (official ``Generator.get_motion``): face crop ``[N, 3, S, S]`` -> ``[N, 512]``.

    A conv pyramid down to 4x4 and a 4x4 conv give a 512-d code; five linear layers (no
    activations between them, as the official) give 20 coefficients that weight the orthonormal
    directions Q of ``qr(direction + 1e-8)``.
    """

    def __init__(self, size: int = 512, style_dim: int = 512, motion_dim: int = 20, out_dim: int = 512):
        super().__init__()
        self.size = size
        convs = [conv_layer(3, LIA_CHANNELS[size], 1)]
        cin = LIA_CHANNELS[size]
        for level in range(int(math.log2(size)), 2, -1):
            cout = LIA_CHANNELS[2 ** (level - 1)]
            convs.append(ResBlock(cin, cout))
            cin = cout
        convs.append(ScaledConv2d(cin, style_dim, 4))
        self.enc = _Level()
        self.enc.net_app = _Level()
        self.enc.net_app.convs = nn.ModuleList(convs)
        self.enc.fc = nn.Sequential(*[ScaledLinear(style_dim, style_dim) for _ in range(4)],
                                    ScaledLinear(style_dim, motion_dim))
        self.dec = _Level()
        self.dec.direction = _Level()
        self.dec.direction.weight = nn.Parameter(torch.randn(out_dim, motion_dim))

    def forward(self, faces: torch.Tensor) -> torch.Tensor:
        """``faces [N, 3, S, S]`` in [-1, 1] -> motion vectors ``[N, out_dim]`` float32."""
        if tuple(faces.shape[-2:]) != (self.size, self.size):
            raise ValueError(f"face crops must be {self.size}x{self.size}, got {tuple(faces.shape[-2:])}")
        h = faces
        for conv in self.enc.net_app.convs:
            h = conv(h)
        alpha = self.enc.fc(h.flatten(1)).float()  # [N, motion_dim]
        # parity: the QR runs in float32 (the official upcasts bf16 for it); +1e-8 as the official.
        q = torch.linalg.qr(self.dec.direction.weight.float() + 1e-8)[0]  # [out_dim, motion_dim]
        return alpha @ q.T  # [N, out_dim] = sum_i alpha_i q_i


class CausalConv1d(nn.Module):
    """Conv1d over time, left-padded by replicating the first frame (kernel - 1 frames)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride=stride)
        self.left = kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, F]`` -> ``[B, C', F']``."""
        return self.conv(F.pad(x.to(self.conv.weight.dtype), (self.left, 0), mode="replicate"))


class FaceEncoder(nn.Module):
    """Motion vectors per face frame -> ``heads + 1`` tokens per latent frame (two stride-2 convs: F -> ceil(F/4))."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 1024, heads: int = 4):
        super().__init__()
        self.heads, self.hidden = heads, hidden
        self.conv1_local = CausalConv1d(in_dim, hidden * heads, 3, stride=1)
        self.conv2 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.conv3 = CausalConv1d(hidden, hidden, 3, stride=2)
        self.out_proj = nn.Linear(hidden, out_dim)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, out_dim))

    def _norm_act(self, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm (no affine, eps 1e-6) over channels then SiLU: ``[B', C, F] -> [B', F, C]``."""
        x = x.transpose(1, 2)
        return F.silu(F.layer_norm(x.float(), (self.hidden,), eps=1e-6).to(x.dtype))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        """``motion [B, F, in_dim]`` -> ``[B, T', heads + 1, out_dim]``."""
        b = motion.shape[0]
        x = self.conv1_local(motion.transpose(1, 2))  # [B, heads*hidden, F]
        x = x.unflatten(1, (self.heads, self.hidden)).flatten(0, 1)  # [B*heads, hidden, F]
        x = self._norm_act(x)  # [B*heads, F, hidden]
        x = self._norm_act(self.conv2(x.transpose(1, 2)))  # [B*heads, F', hidden]
        x = self._norm_act(self.conv3(x.transpose(1, 2)))  # [B*heads, T', hidden]
        x = self.out_proj(x.to(self.out_proj.weight.dtype))  # [B*heads, T', out_dim]
        x = x.unflatten(0, (b, self.heads)).transpose(1, 2)  # [B, T', heads, out_dim]
        pad = self.padding_tokens.to(x.dtype).expand(b, x.shape[1], 1, -1)
        return torch.cat([x, pad], dim=2)  # [B, T', heads + 1, out_dim]


class FaceBlock(nn.Module):
    """Each latent frame's tokens attend to that frame's motion tokens; returns the residual to add."""

    def __init__(self, dim: int, num_heads: int, eps: float = 1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.linear1_kv = nn.Linear(dim, 2 * dim)
        self.linear1_q = nn.Linear(dim, dim)
        self.linear2 = nn.Linear(dim, dim)
        # Per-head RMSNorm (over D, not over all heads as in the DiT's attention).
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)
        self.pre_norm_feat = LayerNorm(dim, eps)
        self.pre_norm_motion = LayerNorm(dim, eps)

    def forward(self, x: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
        """``x [B, L, dim]``, ``motion [B, T, N, dim]`` with L = T*S -> ``[B, L, dim]``."""
        b, length, _ = x.shape
        t, n = motion.shape[1:3]
        if length % t:
            raise ValueError(f"{length} tokens do not split into {t} latent frames")
        h, d = self.num_heads, self.head_dim
        dtype = self.linear1_q.weight.dtype
        kv = self.linear1_kv(self.pre_norm_motion(motion).to(dtype))  # [B, T, N, 2*dim]
        k, v = kv.view(b, t, n, 2, h, d).unbind(3)  # 2 x [B, T, N, H, D]
        q = self.linear1_q(self.pre_norm_feat(x).to(dtype)).view(b, length, h, d)  # [B, L, H, D]
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        q = q.view(b * t, length // t, h, d)  # [B*T, S, H, D]
        out = attention(q, k.reshape(b * t, n, h, d), v.reshape(b * t, n, h, d))  # [B*T, S, H, D]
        return self.linear2(out.reshape(b, length, h * d))  # [B, L, dim]


class FaceAdapter(nn.Module):
    """The face blocks, under the official name ``fuser_blocks``."""

    def __init__(self, dim: int, num_heads: int, num_blocks: int, eps: float = 1e-6):
        super().__init__()
        self.fuser_blocks = nn.ModuleList(FaceBlock(dim, num_heads, eps) for _ in range(num_blocks))
