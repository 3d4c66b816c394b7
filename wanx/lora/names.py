"""Module names: every spelling a LoRA file uses -> the official Wan module name.

The key space is read from a model's own parameter names, so kohya's underscored names are
resolved by lookup (``self_attn_q`` -> ``self_attn.q``), never by guessing which underscores
were dots. Blocks are resolved through block-relative names, so a key for block 39 is recognised
(and reported as out of range) on a 30-block model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..loading.keymaps_dit import diffusers_to_official_key

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_KOHYA_BLOCK = re.compile(r"^blocks_(\d+)_(.+)$")

# Wan 2.1 I2V / FLF2V modules (CLIP image branch) that Wan 2.2 models do not have: LoRAs made
# for those models carry them, and they are dropped with a warning rather than called unknown.
ABSENT_BLOCK_MODULES = ("cross_attn.k_img", "cross_attn.v_img", "cross_attn.norm_k_img")
ABSENT_TOP_MODULES = ("img_emb.proj.0", "img_emb.proj.1", "img_emb.proj.3", "img_emb.proj.4",
                      "img_emb.emb_pos")

# The same modules in diffusers naming (the shared key map only covers what Wan 2.2 has).
_DIFFUSERS_ABSENT_BLOCK = {"attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
                           "attn2.norm_added_k": "cross_attn.norm_k_img"}
_DIFFUSERS_ABSENT_TOP = {"condition_embedder.image_embedder.norm1": "img_emb.proj.0",
                         "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
                         "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
                         "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
                         "condition_embedder.image_embedder.pos_embed": "img_emb.emb_pos"}

# Module-path fragments that only diffusers naming has (a file is read in one naming throughout,
# because ``blocks.N.norm2`` means different modules in the two).
_DIFFUSERS_MARKERS = re.compile(r"(^|\.)(attn1|attn2|condition_embedder|proj_out|scale_shift_table|ffn\.net)(\.|$)")


def is_diffusers_path(path: str) -> bool:
    return _DIFFUSERS_MARKERS.search(path) is not None


def diffusers_to_official_path(path: str) -> str:
    """A diffusers module path in official naming (Wan 2.1 image-branch names included)."""
    m = _BLOCK.match(path)
    if m:
        for src, dst in _DIFFUSERS_ABSENT_BLOCK.items():
            if m.group(2) == src or m.group(2).startswith(src + "."):
                return f"blocks.{m.group(1)}.{dst}{m.group(2)[len(src):]}"
    for src, dst in _DIFFUSERS_ABSENT_TOP.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    return diffusers_to_official_key(path)


def _paths_of(param_names: Iterable[str]) -> set[str]:
    """Every module path and parameter path ("a", "a.b", "a.b.weight") in ``param_names``."""
    out = set()
    for name in param_names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _underscore_map(paths: Iterable[str]) -> dict[str, str]:
    """``a_b_c`` -> ``a.b.c``; names two paths share are left out (they cannot be resolved)."""
    seen: dict[str, str | None] = {}
    for p in paths:
        u = p.replace(".", "_")
        seen[u] = p if u not in seen or seen[u] == p else None
    return {u: p for u, p in seen.items() if p is not None}


@dataclass(frozen=True)
class Resolution:
    """Where a LoRA module path points: ``status`` is "present" (the parameter exists), "absent" (a
    Wan module this model lacks), "out_of_range" (a block past the model's last) or "unknown"."""

    name: str | None
    param: str | None
    status: str


class KeySpace:
    """The parameter names of one Wan DiT, split into top-level and block-relative names."""

    def __init__(self, param_shapes: Mapping[str, tuple[int, ...]], num_layers: int | None):
        self.num_layers = num_layers  # None: any block index is accepted (reference key space)
        self.top: dict[str, tuple[int, ...]] = {}
        self.block: dict[str, tuple[int, ...]] = {}
        for name, shape in param_shapes.items():
            m = _BLOCK.match(name)
            if m:
                self.block[m.group(2)] = tuple(shape)
            else:
                self.top[name] = tuple(shape)
        block_paths = _paths_of(self.block) | set(ABSENT_BLOCK_MODULES)
        top_paths = _paths_of(self.top) | set(ABSENT_TOP_MODULES) | {"blocks"}
        self._kohya_block = _underscore_map(block_paths)
        self._kohya_top = _underscore_map(top_paths)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "KeySpace":
        names = dict((n, tuple(p.shape)) for n, p in model.named_parameters())
        num_layers = len(getattr(model, "blocks", ()))
        return cls(names, num_layers)

    @classmethod
    def reference(cls) -> "KeySpace":
        """Wan DiT names with no model at hand (inspect, convert): a one-block model on meta."""
        from ..configs import DiTConfig
        from ..model.dit import WanDiT

        with torch.device("meta"):
            model = WanDiT(DiTConfig.tiny(num_layers=1))
        names = dict((n, tuple(p.shape)) for n, p in model.named_parameters())
        return cls(names, None)

    # ----------------------------------------------------------------------------- lookups
    def has_param(self, name: str) -> bool:
        m = _BLOCK.match(name)
        if m:
            return self._block_in_range(int(m.group(1))) and m.group(2) in self.block
        return name in self.top

    def _block_in_range(self, index: int) -> bool:
        return self.num_layers is None or index < self.num_layers

    def kohya_path(self, underscored: str) -> str | None:
        """The dotted path of a kohya module name (``blocks_3_self_attn_q`` -> ``blocks.3.self_attn.q``)."""
        m = _KOHYA_BLOCK.match(underscored)
        if m:
            rel = self._kohya_block.get(m.group(2))
            return None if rel is None else f"blocks.{m.group(1)}.{rel}"
        return self._kohya_top.get(underscored)

    def resolve(self, path: str | None, role: str) -> Resolution:
        """Which parameter ``role`` ("weight", "bias", "modulation", "self") of ``path`` changes."""
        if path is None:
            return Resolution(None, None, "unknown")
        candidates = {"weight": [f"{path}.weight"], "bias": [f"{path}.bias"],
                      "modulation": [f"{path}.modulation"],
                      # A bare ``.diff`` targets ``M.weight``, or ``M`` itself for a parameter
                      # such as ``blocks.0.modulation`` (ComfyUI's ``modulation.diff`` spelling).
                      "self": [f"{path}.weight", path]}[role]
        for param in candidates:
            if self.has_param(param):
                return Resolution(path, param, "present")
        m = _BLOCK.match(path)
        rel = m.group(2) if m else None
        if m and not self._block_in_range(int(m.group(1))):
            known = any(self._rel_has(c) for c in candidates) or rel in ABSENT_BLOCK_MODULES
            return Resolution(path, None, "out_of_range" if known else "unknown")
        absent = (rel in ABSENT_BLOCK_MODULES) if m else (path in ABSENT_TOP_MODULES)
        return Resolution(path, None, "absent" if absent else "unknown")

    def _rel_has(self, param: str) -> bool:
        m = _BLOCK.match(param)
        return bool(m) and m.group(2) in self.block
