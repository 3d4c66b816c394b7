"""``QuantLinear`` and weight-only quantization of a model's Linear layers, applied from outside.

A ``QuantLinear`` keeps its weight encoded (:class:`QuantizedWeight`) and dequantizes it to the
compute dtype on every call; the bias stays in high precision. :func:`quantize_model_` swaps the
Linear layers inside ``blocks.`` (the DiT's attention and FFN projections, the umT5 encoder's
attention and feed-forward) for ``QuantLinear`` with symmetric per-output-channel scales; the
embeddings, norms, modulation and output head stay as they are.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .tensor import QuantizedWeight, ScaledCodec

Tensor = torch.Tensor

# Largest code of each on-the-fly kind: int8 symmetric (LightX2V, quanto) and float8 e4m3fn's max.
QMAX = {"int8": 127.0, "fp8": 448.0}
ON_THE_FLY_KINDS = tuple(QMAX)


class QuantLinear(nn.Module):
    """A Linear layer whose weight is stored encoded and dequantized to the compute dtype on use."""

    def __init__(self, weight: QuantizedWeight, bias: Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.dequantized(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.weight.codec.label}, compute={self.weight.dtype}")

    def _apply(self, fn: Callable, recurse: bool = True):
        # ``fn`` (from .to / .cuda / .half ...) is opaque: a 0-element probe tells its target device and
        # dtype. The codes move to that device unchanged; a float dtype becomes the compute dtype.
        weight = self.weight
        self._parameters["weight"] = None  # nn.Module._apply skips it; the bias follows fn as usual
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = weight
        probe = fn(torch.empty(0, dtype=weight.dtype, device=weight.device))
        codec = weight.codec
        if probe.device != weight.device:
            codec = codec.map(lambda t: t.to(probe.device))
        dtype = probe.dtype if probe.is_floating_point() else weight.dtype
        self.weight = nn.Parameter(weight.rewrap(codec, dtype), requires_grad=False)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The stored encoding, not the logical float weight: what a file of this format holds and
        # the memory the layer really takes.
        for name, t in self.weight.codec.tensors().items():
            destination[prefix + name] = t
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()


def check_kind(kind: str, argument: str = "quantize") -> str:
    """``kind`` if wanx can quantize to it on the fly, else an InputError naming ``argument``."""
    if kind not in QMAX:
        raise InputError(argument, f"{{arg}} must be one of {', '.join(ON_THE_FLY_KINDS)}, got {kind!r}")
    return kind


def quantize_weight(weight: Tensor, kind: str, dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Symmetric per-output-channel codes of a 2-D weight: ``scale = max|row| / qmax`` (fp32 ``[out, 1]``).

    int8 codes are rounded to nearest; fp8 codes are float8_e4m3fn (the cast rounds to nearest
    even). An all-zero row gets scale 1 (its codes are 0 either way).
    """
    check_kind(kind)
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)  # [out, 1]
    scale = torch.where(amax > 0, amax / QMAX[kind], torch.ones_like(amax))
    scaled = (w / scale).clamp_(-QMAX[kind], QMAX[kind])
    codes = scaled.round_().to(torch.int8) if kind == "int8" else scaled.to(torch.float8_e4m3fn)
    return QuantizedWeight(ScaledCodec(codes, scale, kind), weight.shape, dtype or weight.dtype)


def is_block_linear(name: str, module: nn.Module) -> bool:
    """The layers wanx quantizes: plain Linear layers inside ``blocks.`` (attention and FFN)."""
    return type(module) is nn.Linear and name.startswith("blocks.")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name`` (works inside Sequential/ModuleList too)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model_(model: nn.Module, kind: str) -> nn.Module:
    """Quantize every block Linear of ``model`` (a WanDiT or UMT5Encoder) in place; returns ``model``.

    Weight-only: ``kind`` "int8" or "fp8" codes with per-output-channel scales, dequantized to the
    layer's current dtype on each call.
    """
    check_kind(kind)
    targets = [(n, m) for n, m in model.named_modules() if is_block_linear(n, m)]
    if not targets:
        raise ValueError(f"{type(model).__name__} has no Linear layers under blocks. to quantize")
    for name, layer in targets:
        with torch.no_grad():
            set_submodule(model, name, QuantLinear(quantize_weight(layer.weight, kind), layer.bias))
    return model


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as stored (quantized weights count their encoding)."""
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        total += t.stored_bytes if isinstance(t, QuantizedWeight) else t.numel() * t.element_size()
    return total
