"""``QuantizedWeight``: a Linear weight kept in its compact encoding that reads as its float values.

The tensor reports the logical shape ``[out, in]`` and the compute dtype, so code that asks a
layer for ``weight.dtype`` or ``weight.shape`` (the DiT casts its attention input to
``q.weight.dtype``; the LoRA code checks shapes) sees an ordinary float weight. Its bytes live in
a codec: ``ScaledCodec`` (int8 or float8 codes times a per-tensor, per-row or per-block scale)
or ``GGMLCodec`` (GGUF blocks). Any torch operation on it runs on the dequantized values;
writing into it is refused, since the compact bytes cannot take an arbitrary float update.
``.to(device)`` keeps the encoding; a change of dtype gives a plain tensor of values.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from . import ggml

Tensor = torch.Tensor
aten = torch.ops.aten


class ScaledCodec:
    """int8 / float8 codes and a float32 scale: scalar, ``[out, 1]`` rows or ``[out, n_blocks, 1]`` blocks."""

    def __init__(self, data: Tensor, scale: Tensor | None, label: str):
        self.data, self.scale, self.label = data, scale, label

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def dequantize(self, shape: torch.Size) -> Tensor:
        w = self.data.to(torch.float32, copy=True)  # never an alias: it is scaled in place
        if self.scale is None:
            return w
        if self.scale.dim() == 3:  # block-wise along the input: [out, n_blocks, 1]
            return w.view(shape[0], self.scale.shape[1], -1).mul_(self.scale).view(shape)
        return w.mul_(self.scale)

    def map(self, fn) -> "ScaledCodec":
        return ScaledCodec(fn(self.data), None if self.scale is None else fn(self.scale), self.label)

    def tensors(self) -> dict[str, Tensor]:
        """The stored tensors under LightX2V's names (``weight``, ``weight_scale``)."""
        out = {"weight": self.data}
        if self.scale is not None:
            out["weight_scale"] = self.scale
        return out


class GGMLCodec:
    """GGUF blocks: uint8 ``[out, row_bytes]`` in one GGML type."""

    def __init__(self, raw: Tensor, ggml_type: int):
        self.raw, self.ggml_type = raw, ggml_type
        self.label = f"gguf {ggml.TYPE_NAMES.get(ggml_type, ggml_type)}"

    @property
    def device(self) -> torch.device:
        return self.raw.device

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self, shape: torch.Size) -> Tensor:
        return ggml.dequantize(self.raw, self.ggml_type, tuple(shape))

    def map(self, fn) -> "GGMLCodec":
        return GGMLCodec(fn(self.raw), self.ggml_type)

    def tensors(self) -> dict[str, Tensor]:
        return {"weight": self.raw, "weight_ggml_type": torch.tensor(self.ggml_type, dtype=torch.int32)}


def _writes_into_quantized(func, args, kwargs) -> bool:
    """Whether ``func`` writes into one of its QuantizedWeight arguments (reading from one is fine)."""
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if isinstance(value, QuantizedWeight):
                return True
    return False


class QuantizedWeight(Tensor):
    """A weight stored as ``codec``; every read sees its values in ``dtype`` (see the module doc)."""

    codec: ScaledCodec | GGMLCodec

    @staticmethod
    def __new__(cls, codec, shape, dtype: torch.dtype):
        return Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=codec.device,
                                             requires_grad=False)

    def __init__(self, codec, shape, dtype: torch.dtype):
        self.codec = codec

    # Results of torch functions are plain tensors: wrapping them in this class would lose the codec.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return (f"QuantizedWeight({self.codec.label}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"device={self.device})")

    @property
    def stored_bytes(self) -> int:
        """Bytes the encoding really takes (``nbytes`` counts the logical float tensor)."""
        return self.codec.nbytes

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """The values as a plain tensor in ``dtype`` (default: this weight's compute dtype)."""
        return self.codec.dequantize(self.shape).to(dtype or self.dtype)

    def rewrap(self, codec=None, dtype: torch.dtype | None = None) -> "QuantizedWeight":
        """The same weight with another codec (e.g. moved) and/or compute dtype."""
        return QuantizedWeight(codec or self.codec, self.shape, dtype or self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default):
            return args[0].rewrap()
        if func is aten.clone.default:
            return args[0].rewrap(args[0].codec.map(torch.clone))
        if func is aten._to_copy.default:
            return _to_copy(args[0], **kwargs)
        if _writes_into_quantized(func, args, kwargs):
            raise RuntimeError(f"{func} would write into a quantized weight, which is read-only; "
                               f"dequantize it first (LoRA: use mode='live')")
        plain = tree_map(lambda a: a.dequantized() if isinstance(a, QuantizedWeight) else a, (args, kwargs))
        return func(*plain[0], **plain[1])


def _to_copy(w: QuantizedWeight, dtype=None, device=None, non_blocking=False, **_) -> Tensor:
    """``.to()``: a new device keeps the encoding; a new dtype yields the plain values in it."""
    device = torch.device(device) if device is not None else w.device
    if dtype is not None and dtype != w.dtype:
        return w.dequantized(dtype).to(device, non_blocking=non_blocking)
    return w.rewrap(w.codec.map(lambda t: t.to(device, non_blocking=non_blocking, copy=True)))
