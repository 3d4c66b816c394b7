"""A ``WanDiT`` whose block Linear layers are ``QuantLinear``, built on the meta device.

The model is created on the meta device, every tensor is read once (encoded weights stay
encoded), the block Linear layers that got an encoded weight are swapped for ``QuantLinear`` and
the remaining tensors assigned: no full-precision copy of the expert is ever made. Encoded
tensors outside the blocks (GGUF files also encode the text/time embeddings and the head) are
dequantized once, so embeddings, norms, modulation and the head run in high precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from ..configs import DiTConfig
from ..device import resolve_dtype
from ..loading.dit import dit_config_from_state_dict
from ..loading.safe import CheckpointError, check_keys, load_pth
from ..model.dit import WanDiT
from .linear import QuantLinear, is_block_linear, quantize_weight, set_submodule
from .readers import (AUX_SUFFIXES, MARKERS, _gguf_reader, _safe_open, check_gguf_arch, gguf_shape,
                      is_gguf, official_namer, read_quantized, strip_prefix)
from .sources import source_config, source_tensors
from .tensor import QuantizedWeight

Tensor = torch.Tensor


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for every parameter of a DiT file, from its header only."""
    if is_gguf(path):
        reader = _gguf_reader(path)
        check_gguf_arch(reader, path)
        name = official_namer(t.name for t in reader.tensors)
        return {name(t.name): gguf_shape(reader, t) for t in reader.tensors}
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        sd = load_pth(path)
        name = official_namer(sd)
        return {name(k): tuple(v.shape) for k, v in sd.items()}
    with _safe_open(path) as f:
        name = official_namer(f.keys())
        return {name(k.removesuffix("._data")): tuple(f.get_slice(k).get_shape()) for k in f.keys()
                if not k.endswith(AUX_SUFFIXES) and strip_prefix(k) not in MARKERS}


def dit_file_config(path: str | os.PathLike, num_heads: int | None = None) -> DiTConfig:
    """The DiTConfig of a DiT single file (GGUF, quantized or plain safetensors, .pth) from tensor shapes.

    Reads the header only. ``num_heads`` is needed when the width is not a multiple of 128.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"DiT file not found: {path}")
    shapes = _file_shapes(path)
    if "patch_embedding.weight" not in shapes and is_gguf(path):
        raise CheckpointError(f"{path} has no patch_embedding.weight: GGUF conversions drop this 5-D tensor "
                              f"and ComfyUI-GGUF's tools/fix_5d_tensors.py adds it back")
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    try:
        return dit_config_from_state_dict(meta, num_heads=num_heads)
    except CheckpointError as e:
        raise CheckpointError(f"{path} is not a Wan 2.2 DiT file: {e}") from None


def _place(t: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor on ``device`` with floating values in ``dtype``; encoded weights keep their encoding."""
    if isinstance(t, QuantizedWeight):
        return t.rewrap(t.codec.map(lambda x: x.to(device)), dtype)
    return t.to(device=device, dtype=dtype if t.is_floating_point() else None)


def _install(model: WanDiT, sd: dict[str, Tensor], device: torch.device, what: str) -> WanDiT:
    """Swap in QuantLinear layers for encoded block weights, assign the rest, check nothing is left."""
    owned = set()
    for key, t in sd.items():
        if not isinstance(t, QuantizedWeight):
            continue
        module = key.removesuffix(".weight")
        if is_block_linear(module, model.get_submodule(module)):
            set_submodule(model, module, QuantLinear(t, sd.get(f"{module}.bias")))
            owned |= {key, f"{module}.bias"}
    plain = {k: (t.dequantized() if isinstance(t, QuantizedWeight) else t)
             for k, t in sd.items() if k not in owned}
    model.load_state_dict(plain, strict=False, assign=True)
    model.reset_buffers(device)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{what}: tensors not provided by the checkpoint: {leftovers[:10]}")
    return model.eval()


def build_dit(cfg: DiTConfig, tensors: Iterable[tuple[str, Tensor]], dtype: torch.dtype,
              device: torch.device, what: str) -> WanDiT:
    """A WanDiT of ``cfg`` from (official key, tensor or QuantizedWeight) pairs, built on meta."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    sd = {k: _place(t, dtype, device) for k, t in tensors}
    check_keys(model.state_dict(), sd, what)
    return _install(model, sd, device, what)


def _resolve(dtype, device) -> tuple[torch.dtype, torch.device]:
    device = torch.device(device)
    return resolve_dtype(dtype, device), device


def load_quantized_dit(path: str | os.PathLike, dtype=None, device="cpu", *,
                       config: DiTConfig | None = None, num_heads: int | None = None) -> WanDiT:
    """Load a quantized DiT file (GGUF, ComfyUI fp8_scaled / comfy_quant, LightX2V, quanto, plain fp8).

    The config is inferred from tensor shapes (``config`` overrides it; ``num_heads`` when the
    width is not a multiple of 128). ``dtype``: the compute dtype (default float32 on CPU,
    bfloat16 on CUDA) of the dequantized weights and of every unquantized tensor.
    """
    path = Path(path)
    dtype, device = _resolve(dtype, device)
    cfg = config or dit_file_config(path, num_heads=num_heads)
    return build_dit(cfg, read_quantized(path), dtype, device, what=f"DiT {path}")


def block_linear_names(cfg: DiTConfig) -> set[str]:
    """Module names of the Linear layers quantization targets in a DiT of ``cfg``."""
    with torch.device("meta"):
        model = WanDiT(cfg)
    return {n for n, m in model.named_modules() if is_block_linear(n, m)}


def load_dit_quantizing(path: str | os.PathLike, kind: str, dtype=None, device="cpu", *,
                        config: DiTConfig | None = None) -> WanDiT:
    """Load a full-precision DiT (folder or file) and quantize its block Linears to ``kind`` while
    reading, one tensor at a time: the same weights as ``quantize_model_(load_dit(path), kind)``
    without ever holding the float model."""
    dtype, device = _resolve(dtype, device)
    cfg = config or source_config(path)
    targets = block_linear_names(cfg)

    def tensors():
        for key, t in source_tensors(path):
            if key.endswith(".weight") and key.removesuffix(".weight") in targets:
                t = quantize_weight(t.to(dtype), kind, dtype)
            yield key, t
    return build_dit(cfg, tensors(), dtype, device, what=f"DiT {path}")
