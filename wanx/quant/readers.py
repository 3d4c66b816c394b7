"""Read quantized single-file DiT checkpoints into official-key tensors and ``QuantizedWeight``s.

One safetensors reader covers every scaled format, layer by layer, from the tensors next to each
``M.weight`` (the prefixes ``model.diffusion_model.`` / ``diffusion_model.`` are dropped and
diffusers names mapped to official ones):

- ComfyUI ``fp8_scaled`` (legacy): a top-level ``scaled_fp8`` marker, float8 ``M.weight`` and a
  scalar ``M.scale_weight`` (kijai files spell it ``M.weight_scale``); ``M.scale_input`` is dropped;
- ComfyUI per-layer metadata: ``M.comfy_quant`` (UTF-8 JSON ``{"format": ...}``) or the header's
  ``_quantization_metadata``; float8_e4m3fn, float8_e5m2 and int8_tensorwise are read (float8
  stored as uint8 too), other formats (nvfp4, mxfp8, rotated int8...) are refused by name;
- LightX2V: int8 or float8 ``M.weight`` with ``M.weight_scale`` float32 ``[out, 1]``;
- optimum-quanto (Wan2GP): ``M.weight._data`` int8 with ``M.weight._scale`` ``[out, 1]``;
- plain float8 files: float8 weights and no scale (scale 1).

GGUF files (``general.architecture`` "wan", tensors under official names, shapes stored
reversed, the 5-D patch embedding as F32) are read with the ``gguf`` package's reader: Q8_0 and
Q4_K/Q5_K/Q6_K weights stay encoded, F32/F16/BF16 tensors become plain tensors, any other GGML
type is dequantized once at load by ``gguf.quants.dequantize``.

Activation scales (``input_scale``, ``scale_input``) are not used: wanx multiplies in the compute
dtype after dequantizing the weight.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..loading.keymaps_dit import SINGLE_FILE_PREFIXES, diffusers_to_official_key, is_diffusers_keys
from ..loading.safe import CheckpointError
from . import ggml
from .tensor import GGMLCodec, QuantizedWeight, ScaledCodec

log = logging.getLogger("wanx")
Tensor = torch.Tensor
GGUF_MAGIC = b"GGUF"
GGUF_ARCH = "wan"

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
CODE_DTYPES = (torch.int8, *FP8)
# Tensors that describe a weight (read with it) or an activation (unused), never model parameters.
AUX_SUFFIXES = (".weight_scale", ".scale_weight", ".scale_input", ".input_scale", ".output_scale",
                ".comfy_quant", ".weight._scale", ".weight_scale_2", ".pre_quant_scale")
MARKERS = ("scaled_fp8",)
COMFY_FORMATS = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
                 "int8_tensorwise": torch.int8}
_ST_CODE_DTYPES = {"I8", "F8_E4M3", "F8_E5M2"}


def strip_prefix(key: str) -> str:
    for prefix in SINGLE_FILE_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: corrupt or truncated safetensors file ({e})") from None


def safetensors_format(path: Path) -> str:
    """The quantized format of a safetensors file from its header, or "float" for a plain one."""
    with _safe_open(path) as f:
        keys = list(f.keys())
        meta = f.metadata() or {}
        if "_quantization_metadata" in meta or any(k.endswith(".comfy_quant") for k in keys):
            return "comfy_quant"
        if any(strip_prefix(k) in MARKERS for k in keys):
            return "fp8_scaled"
        if any(k.endswith(".weight._data") for k in keys):
            return "quanto"
        coded = any(f.get_slice(k).get_dtype() in _ST_CODE_DTYPES for k in keys)
    if coded and any(k.endswith(".weight_scale") for k in keys):
        return "scaled"
    return "fp8" if coded else "float"


def quantized_format(path: str | os.PathLike) -> str:
    """"gguf", a safetensors quantized format, or "float" (a file the plain DiT loader reads)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"DiT file not found: {path}")
    if is_gguf(path):
        return "gguf"
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return "float"
    return safetensors_format(path)


# ------------------------------------------------------------------------------------ safetensors

def _layer_formats(f, meta: dict, path: Path) -> dict[str, dict]:
    """ComfyUI per-layer configs by prefix-stripped module name (header metadata or .comfy_quant)."""
    layers: dict[str, dict] = {}
    if "_quantization_metadata" in meta:
        try:
            raw = json.loads(meta["_quantization_metadata"])["layers"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path}: malformed _quantization_metadata ({e})") from None
        layers = {strip_prefix(k): ({"format": v} if isinstance(v, str) else v) for k, v in raw.items()}
    for key in f.keys():
        if key.endswith(".comfy_quant"):
            text = bytes(f.get_tensor(key).to(torch.uint8).tolist()).decode("utf-8")
            try:
                layers[strip_prefix(key)[: -len(".comfy_quant")]] = json.loads(text)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: {key} is not JSON ({e})") from None
    return layers


def _code_dtype(conf: dict | None, module: str, path: Path) -> torch.dtype | None:
    """The code dtype a ComfyUI layer config declares (None: no config), refusing what wanx cannot read."""
    if conf is None:
        return None
    fmt = conf.get("format")
    if fmt not in COMFY_FORMATS or conf.get("convrot"):
        what = f"{fmt} with a Hadamard rotation" if conf.get("convrot") else repr(fmt)
        raise CheckpointError(f"{path}: layer {module} is quantized as {what}, which wanx cannot read "
                              f"(it reads {', '.join(COMFY_FORMATS)})")
    return COMFY_FORMATS[fmt]


def normalize_scale(scale: Tensor, shape: torch.Size, where: str) -> Tensor:
    """A stored scale as float32: scalar, ``[out, 1]`` (rows) or ``[out, n_blocks, 1]`` (input blocks)."""
    out, inp = shape
    scale = scale.float()
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() == out and scale.shape[0] == out:
        return scale.reshape(out, 1)
    if scale.dim() in (2, 3) and scale.shape[0] == out and inp % scale.shape[1] == 0:
        return scale.reshape(out, scale.shape[1], 1)
    raise CheckpointError(f"{where}: scale of shape {tuple(scale.shape)} does not fit a weight of shape "
                          f"{tuple(shape)} (expected a scalar, [out, 1] or [out, n_blocks, 1])")


def _first(f, keys: set[str], *names: str) -> Tensor | None:
    for name in names:
        if name in keys:
            return f.get_tensor(name)
    return None


def _scaled_weight(f, keys: set[str], key: str, declared: torch.dtype | None, path: Path) -> Tensor | None:
    """The weight stored encoded at ``key`` (an ``M.weight`` or quanto ``M.weight._data``): a
    QuantizedWeight if 2-D, else its plain values; None when ``key`` holds an ordinary float tensor."""
    module = key[: -len(".weight._data")] if key.endswith(".weight._data") else key[: -len(".weight")]
    data = f.get_tensor(key)
    if declared in FP8 and data.dtype == torch.uint8:
        data = data.view(declared)  # ComfyUI also stores float8 codes as raw bytes
    if data.dtype not in CODE_DTYPES:
        return None
    scale = _first(f, keys, f"{module}.weight._scale", f"{module}.weight_scale", f"{module}.scale_weight")
    if data.dtype == torch.int8 and scale is None:
        raise CheckpointError(f"{path}: int8 weight {key} has no scale ({module}.weight_scale)")
    if data.dim() != 2:  # a conv or other non-Linear weight: read it as plain values
        return data.float() if scale is None else data.float() * scale.float()
    if scale is not None:
        scale = normalize_scale(scale, data.shape, f"{path}: {key}")
    label = "int8" if data.dtype == torch.int8 else str(data.dtype).removeprefix("torch.")
    return QuantizedWeight(ScaledCodec(data, scale, label), data.shape, torch.float32)


def official_namer(keys) -> Callable[[str], str]:
    """Maps file keys to official ones: single-file prefix dropped, diffusers names renamed."""
    stripped = [strip_prefix(k) for k in keys]
    diffusers = is_diffusers_keys(stripped)
    return lambda k: diffusers_to_official_key(strip_prefix(k)) if diffusers else strip_prefix(k)


def read_safetensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(official key, tensor or float32-compute QuantizedWeight) for every parameter in ``path``."""
    with _safe_open(path) as f:
        keys = set(f.keys())
        layers = _layer_formats(f, f.metadata() or {}, path)
        name = official_namer(keys)
        for key in sorted(keys):
            bare = strip_prefix(key)
            if bare in MARKERS or key.endswith(AUX_SUFFIXES):
                continue
            if key.endswith((".weight", ".weight._data")):
                module = bare.rsplit(".weight", 1)[0]
                q = _scaled_weight(f, keys, key, _code_dtype(layers.get(module), module, path), path)
                if q is not None:
                    yield name(key.removesuffix("._data")), q
                    continue
            t = f.get_tensor(key)
            yield name(key), t.float() if t.dtype in FP8 else t  # a stray float8 tensor, scale 1


# ------------------------------------------------------------------------------------ GGUF

def _gguf_reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise CheckpointError(f"{path} is a GGUF file; reading it needs the gguf package "
                              f"(pip install 'wanx[quant]' or pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise CheckpointError(f"could not read {path}: corrupt or truncated GGUF file ({e})") from None


def _gguf_field(reader, key: str):
    """A scalar/string field's value, an array field's values as a tuple, or None."""
    field = reader.get_field(key)
    if field is None:
        return None
    values = [field.parts[i] for i in field.data]
    if field.types and int(field.types[0]) == 8:  # GGUFValueType.STRING
        return str(bytes(values[0]), encoding="utf-8")
    if field.types and int(field.types[0]) == 9:  # ARRAY
        return tuple(int(v[0]) for v in values)
    return values[0][0]


def check_gguf_arch(reader, path: Path) -> None:
    arch = _gguf_field(reader, "general.architecture")
    if arch != GGUF_ARCH:
        raise CheckpointError(f"{path} is a GGUF file for architecture {arch!r}; a Wan DiT file has "
                              f"general.architecture '{GGUF_ARCH}'")


def gguf_shape(reader, tensor) -> tuple[int, ...]:
    """The tensor's torch shape: ComfyUI-GGUF's orig_shape field if present, else ggml's dims reversed."""
    orig = _gguf_field(reader, f"comfy.gguf.orig_shape.{tensor.name}")
    return tuple(orig) if orig else tuple(int(d) for d in reversed(tensor.shape.tolist()))


def _gguf_tensor(tensor, shape: tuple[int, ...]) -> Tensor:
    """One GGUF tensor: encoded weights stay encoded, float types become float32, others are decoded."""
    import numpy as np

    ggml_type = int(tensor.tensor_type)
    raw = torch.from_numpy(np.array(tensor.data).view(np.uint8))  # copied off the file's memmap
    if ggml_type in ggml.BLOCK_SIZES and len(shape) == 2:
        codec = GGMLCodec(raw.reshape(shape[0], -1), ggml_type)
        return QuantizedWeight(codec, shape, torch.float32)
    if ggml_type in ggml.TYPE_NAMES:
        return ggml.dequantize(raw, ggml_type, shape)
    import gguf

    log.warning("%s: GGML type %s has no torch decoder in wanx; dequantized once at load",
                tensor.name, tensor.tensor_type.name)
    return torch.from_numpy(gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)).reshape(shape)


def read_gguf(path: Path) -> Iterator[tuple[str, Tensor]]:
    """(official key, tensor or float32-compute QuantizedWeight) for every tensor of a Wan GGUF file."""
    reader = _gguf_reader(path)
    check_gguf_arch(reader, path)
    name = official_namer(t.name for t in reader.tensors)
    for tensor in reader.tensors:
        yield name(tensor.name), _gguf_tensor(tensor, gguf_shape(reader, tensor))


def read_quantized(path: Path) -> Iterator[tuple[str, Tensor]]:
    """The parameters of a quantized DiT file (GGUF or safetensors), official keys, float32 compute."""
    return read_gguf(path) if is_gguf(path) else read_safetensors(path)
