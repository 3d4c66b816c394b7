"""wanx.quant: GGML block decoding and encoding, bit for bit against the gguf package."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wanx.quant import ggml

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
PROMPT = "a red circle moving left"
GEN = dict(size=(64, 64), frame_num=5, sample_steps=3, seed=0)
EXPERTS = ("high_noise_model", "low_noise_model")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bits(x) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32)).view(np.uint32)


# ------------------------------------------------------------------------------------ GGUF decoding

def _random_blocks(qtype, n: int, seed: int) -> np.ndarray:
    """Random K-quant blocks: random bytes everywhere, finite float16 d (and dmin) fields."""
    rng = np.random.default_rng(seed)
    size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    halves = rng.normal(0, 0.01, size=(n, 2)).astype(np.float16).view(np.uint8)  # [n, 4]
    if qtype == Q.Q6_K:
        blocks[:, -2:] = halves[:, :2]  # d is the last field
    else:
        blocks[:, :4] = halves  # d, dmin first (Q2_K..Q5_K; Q8_0 uses the first two bytes)
    return blocks


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_block_decoding_equals_gguf_bit_for_bit(qtype):
    blocks = _random_blocks(qtype, 512, seed=int(qtype))
    if qtype == Q.Q8_0:  # also blocks from the gguf package's own quantizer
        made = gguf.quants.quantize(np.random.default_rng(1).normal(size=(64, 256)).astype(np.float32), qtype)
        blocks = np.concatenate([blocks, made.reshape(-1, 34)])
    block_len = gguf.GGML_QUANT_SIZES[qtype][0]
    rows = blocks.reshape(-1, 2 * blocks.shape[1])  # two blocks per row
    expected = gguf.quants.dequantize(rows, qtype)
    got = ggml.dequantize(torch.from_numpy(rows), int(qtype), (rows.shape[0], 2 * block_len))
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    assert np.array_equal(bits(got.numpy()), bits(expected)), "not bit-identical"


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_float_types_decode_bit_for_bit(qtype):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(8, 64 * 4), dtype=np.uint8)
    if qtype == Q.F16:
        raw = rng.normal(size=(8, 64)).astype(np.float16).view(np.uint8)  # finite values: NaN payloads aside
    width = raw.shape[1] // {Q.F32: 4, Q.F16: 2, Q.BF16: 2}[qtype]
    typed = {Q.F32: raw.view(np.float32), Q.F16: raw.view(np.float16), Q.BF16: raw}[qtype]
    expected = gguf.quants.dequantize(typed, qtype)
    got = ggml.dequantize(torch.from_numpy(raw), int(qtype), (8, width))
    assert np.array_equal(bits(got.numpy()), bits(expected))


def test_q8_0_encoder_is_ggml_reference_bit_for_bit():
    x = np.random.default_rng(2).normal(size=(16, 512)).astype(np.float32)
    x[0, :32] = 0  # an all-zero block
    x[1, :32] = np.linspace(-1.5, 1.5, 32)  # ties at .5 round away from zero in C roundf
    ours = ggml.quantize_q8_0(torch.from_numpy(x)).numpy()
    assert np.array_equal(ours, gguf.quants.quantize(x, Q.Q8_0))


def test_q4_k_encoder_writes_valid_blocks():
    x = torch.randn(8, 512, generator=torch.Generator().manual_seed(0)) * 0.05
    raw = ggml.quantize_q4_k(x)
    assert raw.shape == (8, 2 * 144)
    back = ggml.dequantize(raw, ggml.Q4_K, (8, 512))
    assert np.array_equal(bits(back.numpy()), bits(gguf.quants.dequantize(raw.numpy(), Q.Q4_K)))
    err = rel_err(back, x)
    print(f"Q4_K round trip of Gaussian weights: rel err {err:.3e}")
    assert err < 0.12
