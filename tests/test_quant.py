"""wanx.quant: GGML block decoding, QuantLinear and on-the-fly int8/fp8 of the DiT and umT5."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import wanx
from wanx.configs import DiTConfig, T5Config
from wanx.model import WanDiT
from wanx.quant import QuantLinear, quantize_model_, quantize_weight, stored_bytes
from wanx.quant import ggml
from wanx.text import UMT5Encoder

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


# ------------------------------------------------------------------------------------ QuantLinear

def test_quant_linear_keeps_codes_across_moves_and_reads_as_float():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lin, x = nn.Linear(64, 48), torch.randn(3, 64)
    q = QuantLinear(quantize_weight(lin.weight, "int8"), lin.bias)
    err = rel_err(q(x), lin(x))
    print(f"int8 QuantLinear vs Linear: rel err {err:.2e}")
    assert err < 1e-2
    assert q.weight.shape == (48, 64) and q.weight.dtype == torch.float32 and isinstance(q.weight, nn.Parameter)
    q.to(torch.bfloat16)  # the compute dtype changes, the codes do not
    assert q.weight.dtype == torch.bfloat16 and q.weight.codec.data.dtype == torch.int8
    assert q(x.bfloat16()).dtype == torch.bfloat16
    assert set(q.state_dict()) == {"weight", "weight_scale", "bias"} and q.state_dict()["weight"].dtype == torch.int8
    assert stored_bytes(q) == 48 * 64 + 48 * 4 + 48 * 2  # int8 codes, fp32 scales, bf16 bias
    plain = q.weight.float()  # a new dtype: the plain values
    assert type(plain) is torch.Tensor and torch.equal(plain, q.weight.dequantized(torch.float32))
    assert type(torch.addmm(q.weight.float(), torch.ones(48, 1), torch.ones(1, 64))) is torch.Tensor
    buffer = torch.empty(48, 64, dtype=torch.bfloat16)
    assert torch.equal(buffer.copy_(q.weight), q.weight.dequantized())  # reading into a plain tensor
    with pytest.raises(RuntimeError, match="read-only"), torch.no_grad():
        q.weight.add_(1)
    with pytest.raises(RuntimeError, match="read-only"), torch.no_grad():
        q.weight.copy_(torch.zeros(48, 64))


def test_quantize_model_replaces_only_block_linears():
    model = build_tiny_dit(seed=0)
    quantize_model_(model, "fp8")
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    assert {n for n, k in kinds.items() if k == "QuantLinear"} == {
        n for n in kinds if n.startswith("blocks.")}
    assert kinds["text_embedding.0"] == kinds["head.head"] == "Linear"
    assert model.blocks[0].ffn[0].weight.codec.data.dtype == torch.float8_e4m3fn
    with pytest.raises(wanx.InputError, match="quantize must be one of int8, fp8"):
        quantize_model_(build_tiny_dit(seed=0), "int4")


def build_tiny_dit(seed: int, **cfg) -> WanDiT:
    """A tiny DiT with small random weights (norm weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    model = WanDiT(DiTConfig.tiny(**cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = 0.05 * torch.randn(p.shape, generator=gen)
            p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)
    return model.eval()


# One call on seeded inputs, measured: DiT int8 6.1e-4, fp8 2.4e-3; umT5 int8 7.8e-3, fp8 3.1e-2.
ON_THE_FLY_BOUNDS = {"int8": (2e-3, 2e-2), "fp8": (8e-3, 1e-1)}


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_on_the_fly_dit_and_t5_errors(kind):
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 16, 2, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)
    ids, mask = torch.randint(0, 256, (1, 12), generator=gen), torch.ones(1, 12, dtype=torch.long)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t5 = UMT5Encoder(T5Config.tiny()).eval()
    with torch.no_grad():
        ref_dit, ref_t5 = build_tiny_dit(seed=1)(x, torch.tensor([700.0]), ctx), t5(ids, mask)
        q_dit = quantize_model_(build_tiny_dit(seed=1), kind)(x, torch.tensor([700.0]), ctx)
        q_t5 = quantize_model_(_copy_t5(t5), kind)(ids, mask)
    e_dit, e_t5 = rel_err(q_dit, ref_dit), rel_err(q_t5, ref_t5)
    print(f"on-the-fly {kind}: DiT output rel err {e_dit:.2e}, umT5 output rel err {e_t5:.2e}")
    assert 0 < e_dit < ON_THE_FLY_BOUNDS[kind][0] and 0 < e_t5 < ON_THE_FLY_BOUNDS[kind][1]


def _copy_t5(t5):
    twin = UMT5Encoder(t5.cfg).eval()
    twin.load_state_dict(t5.state_dict())
    return twin
