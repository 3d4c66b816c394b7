"""Scaled dot-product attention with selectable backends.

Every backend takes and returns ``[B, L, H, D]`` (the layout of the official Wan code). The
backend is chosen, in order of precedence, by the ``backend=`` argument, the
:func:`attention_backend` context manager / :func:`set_attention_backend`, the ``WANX_ATTENTION``
environment variable, and finally ``"sdpa"``. A backend that cannot run a given call (not
installed, CPU tensors, ...) falls back to ``"sdpa"`` with one logged warning naming the reason.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import math
import os
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

logger = logging.getLogger("wanx")

BACKENDS = ("sdpa", "math", "flash2", "flash3", "sage")
_HALF = (torch.float16, torch.bfloat16)

_selected: str | None = None  # set by set_attention_backend / attention_backend
_warned: set[str] = set()  # backends whose fallback warning was already logged
_modules: dict[str, object | None] = {}  # import cache: module name -> module or None


def _import(name: str):
    """The module if importable, else None (cached; a failed import is not retried)."""
    if name not in _modules:
        try:
            _modules[name] = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a broken CUDA extension raises all sorts of errors
            _modules[name] = None
    return _modules[name]


_PACKAGES = {"flash2": "flash_attn", "flash3": "flash_attn_interface", "sage": "sageattention"}


def _check_name(name: str) -> str:
    name = name.lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_attention_backend(name: str | None) -> None:
    """Select the attention backend for later calls (None: back to ``WANX_ATTENTION`` / sdpa)."""
    global _selected
    _selected = None if name is None else _check_name(name)


def get_attention_backend() -> str:
    """The backend name a call without ``backend=`` would request."""
    if _selected is not None:
        return _selected
    env = os.environ.get("WANX_ATTENTION")
    return _check_name(env) if env else "sdpa"


@contextlib.contextmanager
def attention_backend(name: str | None) -> Iterator[None]:
    """Use ``name`` as the attention backend inside the ``with`` block."""
    global _selected
    previous = _selected
    set_attention_backend(name)
    try:
        yield
    finally:
        _selected = previous


def available_backends() -> list[str]:
    """Backends usable in this process ("sdpa" and "math" always; the rest need CUDA and a package)."""
    out = ["sdpa", "math"]
    if torch.cuda.is_available():
        out += [b for b, pkg in _PACKAGES.items() if _import(pkg) is not None]
    return out


def _unavailable_reason(name: str, device: torch.device, head_dim: int) -> str | None:
    """Why ``name`` cannot run on tensors of this device and head size, or None when it can."""
    if name in ("sdpa", "math"):
        return None
    if _import(_PACKAGES[name]) is None:
        return f"the {_PACKAGES[name]} package is not importable"
    if device.type != "cuda":
        return f"it needs CUDA tensors, got {device.type}"
    if head_dim > 256:
        return f"head_dim {head_dim} > 256"
    return None


def effective_backend(device: torch.device | str, head_dim: int, backend: str | None = None) -> str:
    """The backend a call on ``device`` with ``head_dim`` would really run (after any fallback)."""
    name = _check_name(backend) if backend is not None else get_attention_backend()
    return "sdpa" if _unavailable_reason(name, torch.device(device), head_dim) is not None else name


BIAS_BACKENDS = ("sdpa", "math")  # backends that accept an additive score bias


def _sdpa(q, k, v, bias=None):
    # SDPA wants [B, H, L, D].
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=bias)  # [B, H, Lq, D]
    return out.transpose(1, 2)  # [B, Lq, H, D]


def _math(q, k, v, bias=None):
    """Reference: softmax(QK^T / sqrt(d) + bias) V, explicitly, in float32."""
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    scores = qf @ kf.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, Lq, Lk]
    if bias is not None:
        scores = scores + bias.float()
    out = scores.softmax(dim=-1) @ vf  # [B, H, Lq, D]
    return out.transpose(1, 2).to(v.dtype)  # [B, Lq, H, D]


def _to_half(*ts: torch.Tensor) -> list[torch.Tensor]:
    # The flash kernels only take fp16/bf16; the official code casts fp32 inputs to bf16 the same way.
    return [t if t.dtype in _HALF else t.to(torch.bfloat16) for t in ts]


def _flash(q, k, v, *, version: int):
    mod = _import("flash_attn_interface" if version == 3 else "flash_attn")
    out = mod.flash_attn_func(*_to_half(q, k, v))
    if isinstance(out, tuple):  # some flash_attn_interface versions also return the LSE
        out = out[0]
    return out  # [B, Lq, H, D]


def _sage(q, k, v):
    sageattn = _import("sageattention").sageattn
    return sageattn(*_to_half(q, k, v), tensor_layout="NHD", is_causal=False)  # [B, Lq, H, D]


_IMPLS: dict[str, Callable] = {
    "sdpa": _sdpa,
    "math": _math,
    "flash2": functools.partial(_flash, version=2),
    "flash3": functools.partial(_flash, version=3),
    "sage": _sage,
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, bias: torch.Tensor | None = None,
              backend: str | None = None) -> torch.Tensor:
    """Softmax attention over ``[B, L, H, D]`` tensors (every key attended, as the Wan DiT does).

    ``bias`` (``[B, 1, 1, Lk]``, added to the scaled scores; ``-inf`` masks a key) is accepted only
    by the backends in :data:`BIAS_BACKENDS`. q and k are cast to v's dtype (as the official code
    does); the result is ``[B, Lq, H, D]`` in v's dtype.
    """
    name = _check_name(backend) if backend is not None else get_attention_backend()
    reason = _unavailable_reason(name, q.device, q.shape[-1])
    if reason is not None:
        if name not in _warned:
            _warned.add(name)
            logger.warning("attention backend %r unavailable (%s); falling back to sdpa", name, reason)
        name = "sdpa"
    q, k = q.to(v.dtype), k.to(v.dtype)
    if bias is None:
        return _IMPLS[name](q, k, v).to(v.dtype)
    if name not in BIAS_BACKENDS:
        raise ValueError(f"a score bias needs one of {BIAS_BACKENDS} (backend {name!r})")
    return _IMPLS[name](q, k, v, bias.to(v.dtype)).to(v.dtype)
