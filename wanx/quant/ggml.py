"""GGML block formats (the tensor encodings inside GGUF files) in vectorized torch.

Decoding gives float32 values equal bit for bit to ``gguf.quants.dequantize``: every product and
difference is one float32 operation in the same order as the reference (no fused multiply-add).
Encoding covers what wanx writes: Q8_0 (bit-exact with ggml's reference quantizer) and a plain
round-to-nearest Q4_K (valid blocks, but without llama.cpp's search for the best sub-block ranges,
so its error is somewhat larger than a llama.cpp Q4_K).

Layouts (a super-block of 256 values is split into sub-blocks; d/dmin are float16):
- Q8_0 (32 values, 34 bytes): d, 32 x int8 q; value = d * q.
- Q4_K (256, 144): d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes of
  4-bit q (two sub-blocks share each byte); value = (d * scale) * q - (dmin * min).
- Q5_K (256, 176): Q4_K plus a 32-byte plane holding the fifth bit of every q.
- Q6_K (256, 210): 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales, d;
  value = (d * scale) * (q - 32), 16 sub-blocks of 16.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

# GGML type ids (the GGUF file's per-tensor type field) of the types decoded here.
F32, F16, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 8, 12, 13, 14, 30
QK_K = 256
# type id -> (values per block, bytes per block)
BLOCK_SIZES = {Q8_0: (32, 34), Q4_K: (QK_K, 144), Q5_K: (QK_K, 176), Q6_K: (QK_K, 210)}
TYPE_NAMES = {F32: "F32", F16: "F16", BF16: "BF16", Q8_0: "Q8_0", Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K"}


def _halves(raw: Tensor) -> Tensor:
    """``[n, 2k]`` uint8 little-endian float16 fields -> float32 ``[n, k]``."""
    return raw.contiguous().view(torch.float16).float()


def _shifts(*bits: int, device) -> Tensor:
    return torch.tensor(bits, dtype=torch.uint8, device=device)


def _k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K/Q5_K 12-byte fields -> (scales, mins), each uint8 ``[n, 8]`` in 0..63.

    Sub-blocks 0-3 keep their 6 bits in the low bits of bytes 0-3 (scales) and 4-7 (mins);
    sub-blocks 4-7 put their low 4 bits in bytes 8-11 and their top 2 bits in the top bits of
    bytes 0-7.
    """
    lo_sc, lo_mn, nib = packed.reshape(-1, 3, 4).unbind(1)  # 3 x [n, 4]
    scales = torch.cat([lo_sc & 63, (nib & 15) | ((lo_sc >> 2) & 48)], dim=1)
    mins = torch.cat([lo_mn & 63, (nib >> 4) | ((lo_mn >> 2) & 48)], dim=1)
    return scales, mins


def _q8_0(blocks: Tensor) -> Tensor:
    d = _halves(blocks[:, :2])  # [n, 1]
    q = blocks[:, 2:].contiguous().view(torch.int8).float()  # [n, 32]
    return q * d


def _q4_k_like(blocks: Tensor, high_bits: Tensor | None) -> Tensor:
    """Q4_K (``high_bits`` None) and Q5_K (``high_bits`` [n, 32]): sub-block affine 4/5-bit values."""
    n = blocks.shape[0]
    d, dmin = _halves(blocks[:, 0:2]), _halves(blocks[:, 2:4])  # [n, 1]
    scales, mins = _k_scales(blocks[:, 4:16])
    qs = blocks[:, -128:]
    d = (d * scales.float()).reshape(n, 8, 1)
    dm = (dmin * mins.float()).reshape(n, 8, 1)
    q = (qs.reshape(n, 4, 1, 32) >> _shifts(0, 4, device=qs.device).reshape(1, 1, 2, 1)) & 15  # [n, 4, 2, 32]
    q = q.reshape(n, 8, 32)
    if high_bits is not None:
        bit = high_bits.reshape(n, 1, 1, 32) >> _shifts(*range(8), device=qs.device).reshape(1, 1, 8, 1)
        q = q | ((bit & 1).reshape(n, 8, 32) << 4)
    return (d * q.float() - dm).reshape(n, QK_K)


def _q6_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    d = (_halves(blocks[:, 208:210]) * scales).reshape(n, 16, 1)
    low = (ql.reshape(n, 2, 1, 64) >> _shifts(0, 4, device=ql.device).reshape(1, 1, 2, 1)) & 15
    high = (qh.reshape(n, 2, 1, 32) >> _shifts(0, 2, 4, 6, device=ql.device).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, 16, 16).float()).reshape(n, QK_K)


_DECODERS = {Q8_0: _q8_0, Q4_K: lambda b: _q4_k_like(b, None),
             Q5_K: lambda b: _q4_k_like(b, b[:, 16:48]), Q6_K: _q6_k}


def dequantize(raw: Tensor, ggml_type: int, shape: tuple[int, ...]) -> Tensor:
    """GGML-encoded bytes (uint8, one row of blocks per tensor row) -> float32 ``shape``."""
    if ggml_type == F32:
        return raw.contiguous().view(torch.float32).reshape(shape)
    if ggml_type == F16:
        return raw.contiguous().view(torch.float16).float().reshape(shape)
    if ggml_type == BF16:
        return raw.contiguous().view(torch.bfloat16).float().reshape(shape)
    if ggml_type not in _DECODERS:
        raise ValueError(f"GGML type {ggml_type} has no torch decoder (have {sorted(TYPE_NAMES.values())})")
    block_bytes = BLOCK_SIZES[ggml_type][1]
    blocks = raw.reshape(-1, block_bytes)  # [n_blocks, bytes]
    return _DECODERS[ggml_type](blocks).reshape(shape)


def encoded_row_bytes(ggml_type: int, row_len: int) -> int:
    """Bytes that one row of ``row_len`` values takes in ``ggml_type`` (which must divide it in blocks)."""
    values, nbytes = BLOCK_SIZES[ggml_type]
    if row_len % values:
        raise ValueError(f"a row of {row_len} values is not a whole number of {TYPE_NAMES[ggml_type]} "
                         f"blocks of {values}")
    return row_len // values * nbytes


def _round_half_away(x: Tensor) -> Tensor:
    """Round to nearest, ties away from zero (C ``roundf``), exactly: no ``x + 0.5`` rounding slip."""
    whole = torch.trunc(x)
    return whole + torch.where((x - whole).abs() >= 0.5, torch.sign(x), torch.zeros_like(x))


def quantize_q8_0(values: Tensor) -> Tensor:
    """float ``[..., k]`` (k a multiple of 32) -> Q8_0 bytes ``[..., k / 32 * 34]``, as ggml's reference."""
    shape = values.shape
    encoded_row_bytes(Q8_0, shape[-1])
    blocks = values.float().reshape(-1, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # [n, 1]
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = _round_half_away(blocks * inv).to(torch.int8)
    out = torch.cat([d.to(torch.float16).view(torch.uint8), q.view(torch.uint8)], dim=1)  # [n, 34]
    return out.reshape(*shape[:-1], -1)


def _pack_k_scales(scales: Tensor, mins: Tensor) -> Tensor:
    """uint8 ``[n, 8]`` scales and mins (0..63) -> the 12-byte Q4_K field (inverse of ``_k_scales``)."""
    lo_sc = scales[:, :4] | ((scales[:, 4:] >> 4) << 6)
    lo_mn = mins[:, :4] | ((mins[:, 4:] >> 4) << 6)
    nib = (scales[:, 4:] & 15) | ((mins[:, 4:] & 15) << 4)
    return torch.cat([lo_sc, lo_mn, nib], dim=1)  # [n, 12]


def quantize_q4_k(values: Tensor) -> Tensor:
    """float ``[..., k]`` (k a multiple of 256) -> Q4_K bytes, by round-to-nearest on min/max ranges.

    Each sub-block of 32 maps [min(x, 0), max(x)] onto 0..15; the 8 ranges and offsets are then
    stored as 6-bit multiples of a float16 d and dmin, and q is rounded against those stored values.
    """
    shape = values.shape
    encoded_row_bytes(Q4_K, shape[-1])
    sub = values.float().reshape(-1, 8, 32)  # [n, 8, 32]
    low = sub.amin(dim=2).clamp(max=0)  # [n, 8]
    step = (sub.amax(dim=2) - low) / 15
    offset = -low
    d = (step.amax(dim=1, keepdim=True) / 63).to(torch.float16)  # [n, 1]
    dmin = (offset.amax(dim=1, keepdim=True) / 63).to(torch.float16)
    sc = torch.where(d > 0, step / d.float(), 0).round().clamp(0, 63)
    mn = torch.where(dmin > 0, offset / dmin.float(), 0).round().clamp(0, 63)
    scale_eff = (d.float() * sc).unsqueeze(2)  # [n, 8, 1]
    min_eff = (dmin.float() * mn).unsqueeze(2)
    q = torch.where(scale_eff > 0, (sub + min_eff) / scale_eff, 0).round().clamp(0, 15).to(torch.uint8)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)  # sub-block 2i low nibble, 2i+1 high
    halves = torch.cat([d, dmin], dim=1).view(torch.uint8)  # [n, 4]
    packed = _pack_k_scales(sc.to(torch.uint8), mn.to(torch.uint8))
    return torch.cat([halves, packed, qs], dim=1).reshape(*shape[:-1], -1)
