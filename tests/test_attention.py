"""Attention backends: agreement, the score bias, selection and fallback."""

import importlib
import logging
import math

import pytest
import torch

from wanx.model import attention, attention_backend, available_backends, set_attention_backend
from wanx.model.attention import get_attention_backend

# The package exports the function ``attention``, which shadows the submodule of the same name.
attn_mod = importlib.import_module("wanx.model.attention")


def _qkv(b=2, lq=10, lk=12, h=3, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype) for n in (lq, lk, lk)]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch):
    monkeypatch.delenv("WANX_ATTENTION", raising=False)
    set_attention_backend(None)
    yield
    set_attention_backend(None)


def test_sdpa_matches_math_reference():
    q, k, v = _qkv()
    out = attention(q, k, v, backend="sdpa")
    ref = attention(q, k, v, backend="math")
    assert out.shape == (2, 10, 3, 16)
    err = _rel(out, ref)
    print(f"sdpa vs math rel err {err:.2e}")
    assert err < 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_minus_infinity_bias_masks_keys_like_slicing_them_away(backend):
    q, k, v = _qkv()
    lens = torch.tensor([12, 5])
    bias = torch.where(torch.arange(12)[None, :] < lens[:, None], 0.0, float("-inf"))[:, None, None, :]
    masked = attention(q, k, v, bias=bias, backend=backend)
    for i, n in enumerate(lens.tolist()):
        sliced = attention(q[i:i + 1], k[i:i + 1, :n], v[i:i + 1, :n], backend=backend)
        assert _rel(masked[i:i + 1], sliced) < 1e-6
    # The bias must matter: sample 1 differs from unbiased attention.
    assert _rel(masked[1:], attention(q, k, v, backend=backend)[1:]) > 1e-3


def test_log_count_bias_weighs_a_key_like_that_many_copies():
    """What the DiT's text compaction relies on: m equal keys == one key with +log(m) on its score."""
    q, k, v = _qkv(lk=4)
    k3 = torch.cat([k, k[:, -1:], k[:, -1:]], dim=1)  # the last key three times
    v3 = torch.cat([v, v[:, -1:], v[:, -1:]], dim=1)
    bias = torch.zeros(2, 1, 1, 4)
    bias[..., 3] = math.log(3)
    for backend in ("sdpa", "math"):
        assert _rel(attention(q, k, v, bias=bias, backend=backend), attention(q, k3, v3, backend=backend)) < 1e-5


def test_bias_is_refused_by_backends_that_cannot_take_it(monkeypatch):
    monkeypatch.setattr(attn_mod, "_unavailable_reason", lambda *a: None)  # as if flash-attn were usable
    monkeypatch.setitem(attn_mod._IMPLS, "flash2", lambda *a: pytest.fail("the kernel must not run"))
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="score bias"):
        attention(q, k, v, bias=torch.zeros(2, 1, 1, 12), backend="flash2")


def test_q_k_cast_to_v_dtype():
    q, k, _ = _qkv()
    v = _qkv(dtype=torch.bfloat16, seed=1)[2]
    out = attention(q, k, v)
    assert out.dtype == torch.bfloat16
    assert _rel(out, attention(q, k, v, backend="math")) < 2e-2


def test_selection_context_manager_and_env(monkeypatch):
    assert get_attention_backend() == "sdpa"
    with attention_backend("math"):
        assert get_attention_backend() == "math"
        with attention_backend("sdpa"):
            assert get_attention_backend() == "sdpa"
        assert get_attention_backend() == "math"
    assert get_attention_backend() == "sdpa"
    monkeypatch.setenv("WANX_ATTENTION", "math")
    assert get_attention_backend() == "math"
    set_attention_backend("sdpa")  # an explicit choice beats the environment
    assert get_attention_backend() == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("nope")


def test_selected_backend_is_used(monkeypatch):
    calls = []
    monkeypatch.setitem(attn_mod._IMPLS, "math", lambda *a: calls.append(1) or attn_mod._math(*a))
    q, k, v = _qkv()
    with attention_backend("math"):
        attention(q, k, v)
    attention(q, k, v)
    assert calls == [1]


def test_unavailable_backend_falls_back_with_one_warning(caplog):
    if "flash2" in available_backends():
        pytest.skip("flash_attn is usable here")
    attn_mod._warned.discard("flash2")
    q, k, v = _qkv()
    with caplog.at_level(logging.WARNING, logger="wanx"):
        out = attention(q, k, v, backend="flash2")
        attention(q, k, v, backend="flash2")
    warnings = [r for r in caplog.records if "flash2" in r.getMessage()]
    assert len(warnings) == 1 and "falling back to sdpa" in warnings[0].getMessage()
    assert torch.equal(out, attention(q, k, v, backend="sdpa"))


def test_available_backends_lists_portable_ones():
    names = available_backends()
    assert names[:2] == ["sdpa", "math"]
    if not torch.cuda.is_available():
        assert names == ["sdpa", "math"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flash2", "flash3", "sage"])
def test_cuda_backends_agree_with_math(backend):
    if backend not in available_backends():
        pytest.skip(f"{backend} not installed")
    q, k, v = _qkv(b=2, lq=300, lk=280, h=4, d=128, dtype=torch.bfloat16, device="cuda")
    out = attention(q, k, v, backend=backend)
    err = _rel(out, attention(q, k, v, backend="math"))
    print(f"{backend} rel err {err:.2e}")
    assert out.shape == q.shape and err < 3e-2
