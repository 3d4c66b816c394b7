"""DiT state-dict key names: official ``WanModel`` <-> diffusers ``WanTransformer3DModel``.

The renames act on whole module paths (matched up to a ``.`` boundary), so the two directions are
exact inverses. Keys outside the maps (other model families) pass through unchanged and are
reported by the strict key check when loading.
"""

from __future__ import annotations

import re
from typing import Mapping, TypeVar

V = TypeVar("V")

# Official module path -> diffusers module path, outside the blocks.
_TOP = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
}

# Inside ``blocks.{i}.``. Note the swap: official norm3 (affine, before cross-attention) is diffusers
# norm2; official norm2 (FFN, no parameters) is diffusers norm3 and has no keys.
_BLOCK = {
    "modulation": "scale_shift_table",
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
for _off, _dif in (("self_attn", "attn1"), ("cross_attn", "attn2")):
    _BLOCK.update({f"{_off}.{p}": f"{_dif}.to_{p}" for p in "qkv"})
    _BLOCK.update({f"{_off}.o": f"{_dif}.to_out.0", f"{_off}.norm_q": f"{_dif}.norm_q",
                   f"{_off}.norm_k": f"{_dif}.norm_k"})

_TOP_INV = {v: k for k, v in _TOP.items()}
_BLOCK_INV = {v: k for k, v in _BLOCK.items()}
_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.+)$")

SINGLE_FILE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def _rename(name: str, table: Mapping[str, str]) -> str | None:
    """Rename the module path of ``name`` by ``table``, or None when no entry matches."""
    for src, dst in table.items():
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return None


def _convert_key(key: str, top: Mapping[str, str], block: Mapping[str, str]) -> str:
    m = _BLOCK_RE.match(key)
    if m:
        new = _rename(m.group(2), block)
        return key if new is None else m.group(1) + new
    new = _rename(key, top)
    return key if new is None else new


def official_to_diffusers_key(key: str) -> str:
    """One official DiT key in diffusers naming (unknown keys unchanged)."""
    return _convert_key(key, _TOP, _BLOCK)


def diffusers_to_official_key(key: str) -> str:
    """One diffusers DiT key in official naming (unknown keys unchanged)."""
    return _convert_key(key, _TOP_INV, _BLOCK_INV)


def official_to_diffusers(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename an official DiT state dict to diffusers keys (tensors untouched)."""
    return {official_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_official(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename a diffusers DiT state dict to official keys (tensors untouched)."""
    return {diffusers_to_official_key(k): v for k, v in sd.items()}


def strip_single_file_prefix(sd: Mapping[str, V]) -> dict[str, V]:
    """Drop a ``model.diffusion_model.`` or ``diffusion_model.`` key prefix (ComfyUI-style files)."""
    out = {}
    for k, v in sd.items():
        for prefix in SINGLE_FILE_PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix):]
                break
        out[k] = v
    return out


def is_diffusers_keys(keys) -> bool:
    """True when the keys use diffusers names (``condition_embedder.*``, ``proj_out``, ``attn1``)."""
    return any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in keys)
