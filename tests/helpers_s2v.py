"""Test helpers for S2V: the official S2V modules loaded by file path, and tiny random weights.

The official ``wan`` package (unpacked from the ``wan22`` wheel) cannot be imported as a package
here: its ``__init__`` pulls in every pipeline (decord, librosa, easydict, flash-attn ...). Its S2V
modules are loaded file by file under a private package name instead, with the few imports they
make that are not installed replaced by stubs (never used on the paths the tests run).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from wanx.model import attention

OFFICIAL_SRC_DEFAULT = Path(__file__).resolve().parents[1] / ".venv" / "reference" / "wan"
PKG = "_wan_s2v_official"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference over the reference's max magnitude."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def randomize_(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter (zero-initialised ones included) random, at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2 and "modulation" not in name and "padding_tokens" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


# ------------------------------------------------------------------------------ einops stand-in

def _groups(side: str) -> list[list[str]]:
    """'b (n c) t' -> [['b'], ['n', 'c'], ['t']]."""
    out, group = [], None
    for tok in side.replace("(", " ( ").replace(")", " ) ").split():
        if tok == "(":
            group = []
        elif tok == ")":
            out.append(group)
            group = None
        elif group is not None:
            group.append(tok)
        else:
            out.append([tok])
    return out


def _rearrange(x: torch.Tensor, pattern: str, **sizes: int) -> torch.Tensor:
    """The subset of ``einops.rearrange`` the official S2V modules use (reshape/permute patterns)."""
    left, right = (_groups(s) for s in pattern.split("->"))
    known = dict(sizes)
    for group, dim in zip(left, x.shape):
        unknown = [n for n in group if n not in known]
        rest = math.prod(known[n] for n in group if n in known)
        if len(unknown) == 1:
            known[unknown[0]] = dim // rest
    names = [n for g in left for n in g]
    x = x.reshape([known[n] for n in names])
    order = [n for g in right for n in g]
    x = x.permute([names.index(n) for n in order])
    return x.reshape([math.prod(known[n] for n in g) for g in right])


@contextlib.contextmanager
def _stubbed_imports():
    """Stand-ins, while the official modules are executed, for packages they import at the top but
    this environment need not have (einops: reshapes; librosa: only its load(), which tests bypass).

    They are removed again afterwards so that other libraries probing for the packages see none.
    """
    added = []
    for name, stub in (("einops", types.SimpleNamespace(rearrange=_rearrange, repeat=None)),
                       ("librosa", types.SimpleNamespace())):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        sys.modules[name] = stub
        added.append(name)
    try:
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def _package(name: str, path: Path | None) -> None:
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(path)] if path is not None else []
        sys.modules[name] = pkg


def _exec(name: str, path: Path):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _key_bias(k_lens, num_keys):
    """The official varlen ``k_lens`` as an additive key bias (0 kept, -inf masked)."""
    if k_lens is None:
        return None
    keep = torch.arange(num_keys)[None, :] < k_lens.cpu()[:, None]  # [B, Lk]
    return torch.where(keep, 0.0, float("-inf"))[:, None, None, :]


def _official_attention(q, k, v, k_lens=None, **_):
    return attention(q, k, v, bias=_key_bias(k_lens, k.shape[1]))


def official_s2v_modules() -> types.SimpleNamespace:
    """The official ``model_s2v``, ``audio_utils``, ``motioner``, ``s2v_utils`` and ``audio_encoder`` modules.

    Their flash attention is replaced by wanx's ``attention`` (official ``k_lens`` as a key bias);
    the sequence-parallel helpers they import are stubs (context parallel is never switched on).
    """
    root = Path(os.environ.get("WANX_OFFICIAL_SRC", OFFICIAL_SRC_DEFAULT))
    if not (root / "modules" / "s2v" / "model_s2v.py").is_file():
        message = f"official Wan source not found at {root} (`bash scripts/setup.sh all` fetches it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("diffusers")
    _package(PKG, root)
    _package(f"{PKG}.modules", root / "modules")
    _package(f"{PKG}.modules.s2v", root / "modules" / "s2v")
    _package(f"{PKG}.distributed", None)
    sp = types.ModuleType(f"{PKG}.distributed.sequence_parallel")
    for fn in ("distributed_attention", "gather_forward", "get_rank", "get_world_size"):
        setattr(sp, fn, None)
    sys.modules.setdefault(sp.__name__, sp)
    import diffusers.models.modeling_utils  # noqa: F401 - before any stub is in place
    import transformers  # noqa: F401

    with _stubbed_imports():
        _exec(f"{PKG}.modules.attention", root / "modules" / "attention.py")
        model = _exec(f"{PKG}.modules.model", root / "modules" / "model.py")
        mods = {}
        for name in ("s2v_utils", "auxi_blocks", "audio_utils", "motioner", "model_s2v", "audio_encoder"):
            mods[name] = _exec(f"{PKG}.modules.s2v.{name}", root / "modules" / "s2v" / f"{name}.py")
    for mod in (model, mods["model_s2v"], mods["motioner"]):
        mod.flash_attention = _official_attention
    return types.SimpleNamespace(model=model, **mods)
