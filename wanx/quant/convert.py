"""``convert_quantized``: write a full-precision DiT as a quantized single file users can keep.

- ``int8`` / ``fp8``: LightX2V-style safetensors: each block Linear weight as int8 or
  float8_e4m3fn codes (``M.weight``) with its float32 per-output-channel scale
  (``M.weight_scale`` ``[out, 1]``); every other tensor as stored in the source. The codes are
  those :func:`wanx.quant.quantize_model_` computes, so the file loads back to the same weights.
- ``q8_0``: a GGUF file (``general.architecture`` "wan", official tensor names) written with the
  ``gguf`` package's writer: block Linear weights in Q8_0 (bit-exact with ggml's reference
  quantizer), every other tensor in its source float type (F32, F16 or BF16), the 5-D patch
  embedding included.

The source is read one tensor at a time; the quantized tensors are held until the file is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from ..atomic import atomic_output
from ..errors import InputError
from ..loading.safe import CheckpointError
from . import ggml
from .dit import block_linear_names
from .linear import quantize_weight
from .sources import source_config, source_tensors

Tensor = torch.Tensor
CONVERT_KINDS = {"int8": ".safetensors", "fp8": ".safetensors", "q8_0": ".gguf"}


def _check_paths(src: Path, dst: Path, kind: str) -> None:
    if kind not in CONVERT_KINDS:
        raise InputError("quantize", f"{{arg}} must be one of {', '.join(CONVERT_KINDS)}, got {kind!r}")
    if not src.exists():
        raise CheckpointError(f"DiT checkpoint not found: {src}")
    if dst.exists() and os.path.samefile(src, dst):
        raise InputError("dst", f"{{arg}} is the source ({src}); converting in place would destroy it")
    suffix = CONVERT_KINDS[kind]
    if dst.suffix != suffix:
        raise InputError("dst", f"{{arg}} {dst.name}: a {kind} file is written as {suffix}; name it *{suffix}")


def _tagged(src: Path, targets: set[str]) -> Iterator[tuple[str, Tensor, bool]]:
    """(official key, tensor, whether it is a block Linear weight to quantize) for the source."""
    for key, t in source_tensors(src):
        yield key, t, key.endswith(".weight") and key.removesuffix(".weight") in targets


def _write_scaled(src: Path, targets: set[str], kind: str, out: Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for key, t, quantize in _tagged(src, targets):
        if quantize:
            q = quantize_weight(t, kind)
            tensors[key], tensors[f"{key}_scale"] = q.codec.data, q.codec.scale
        else:
            tensors[key] = t.contiguous()
    save_file(tensors, str(out), metadata={"format": "pt", "wanx_quantization":
                                            f"{kind} weight-only, per-output-channel scale (LightX2V layout)"})


def _gguf_array(t: Tensor):
    """A float tensor as (numpy array, GGML type or None) for GGUFWriter.add_tensor."""
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hand over the raw bytes
        return t.view(torch.uint8).numpy(), ggml.BF16
    if t.dtype == torch.float16:
        return t.numpy(), None
    return t.float().numpy(), None


def _write_gguf(src: Path, targets: set[str], out: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for key, t, quantize in _tagged(src, targets):
        if quantize:
            array, raw_type = ggml.quantize_q8_0(t).numpy(), ggml.Q8_0
        else:
            array, raw_type = _gguf_array(t)
        writer.add_tensor(key, array, raw_dtype=None if raw_type is None else gguf.GGMLQuantizationType(raw_type))
    writer.write_header_to_file(path=out)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def convert_quantized(src: str | os.PathLike, dst: str | os.PathLike, kind: str, overwrite: bool = False) -> Path:
    """Write the full-precision DiT at ``src`` (official/diffusers folder or single file) quantized.

    ``kind``: "int8" or "fp8" (LightX2V-style ``.safetensors``) or "q8_0" (``.gguf``). Only the
    block Linear layers are quantized. The file appears whole under ``dst`` or not at all;
    an existing ``dst`` is replaced only with ``overwrite``. Returns ``dst``.
    """
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst, kind)
    targets = block_linear_names(source_config(src))
    with atomic_output(dst, overwrite=overwrite) as tmp:
        if kind == "q8_0":
            _write_gguf(src, targets, tmp)
        else:
            _write_scaled(src, targets, kind, tmp)
    return dst
