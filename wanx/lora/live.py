"""Live (unmerged) LoRA on a Linear layer: its stored weight is never changed.

A ``LiveLinear`` replaces the layer's ``forward`` on the instance (no change to the model code or
to its state-dict keys) while LoRAs are live on it, and picks per call the cheaper of two equal
formulas for ``y = W x + b + sum_i (B_i (A_i x) + D_i x + c_i)`` (strengths folded in):

- low rank: the layer's own output plus ``B (A x)``: ``N r (in + out)`` multiply-adds for N rows;
- merged on the fly: one ``x (W + B A)^T`` with the sum built in float32 and cast to W's dtype
  (rounded once, as ``fuse`` does): ``r in out`` extra multiply-adds, whatever N.

The merged weight is built in a work buffer shared by the stack's layers (see WorkBuffers).
Merging wins once ``N (in + out) > in out`` (about 770 rows at width 1536, 2560 at 5120; a video
has thousands to tens of thousands), low rank wins on short inputs (cross-attention k/v on the
text rows). Weights that are not floating point (quantized layers) always take the low-rank path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


class LiveDelta:
    """One LoRA's contribution to one Linear layer, kept in float32.

    ``pairs``: (down ``[r, in]``, up ``[out, r]``) with strength x scale folded into ``up``;
    ``dense``: a full ``[out, in]`` delta (LoHa, LoKr, ``.diff``) times the strength; ``bias``: ``[out]``.
    """

    def __init__(self, pairs: list[tuple[Tensor, Tensor]], dense: Tensor | None, bias: Tensor | None):
        self.pairs, self.dense, self.bias = pairs, dense, bias
        self._cast: tuple | None = None  # (device, dtype, pairs, dense, bias) for the low-rank path

    def _to(self, device: torch.device, dtype: torch.dtype):
        move = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
        return [(move(d), move(u)) for d, u in self.pairs], move(self.dense), move(self.bias)

    def master(self, device: torch.device) -> tuple:
        """The float32 factors on ``device`` (moved once if offloading moved the layer)."""
        ref = self.pairs[0][0] if self.pairs else (self.dense if self.dense is not None else self.bias)
        if ref.device != device:
            self.pairs, self.dense, self.bias = self._to(device, torch.float32)
            self._cast = None
        return self.pairs, self.dense, self.bias

    def in_dtype(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """The factors in the compute dtype (cached; the float32 ones themselves when that is fp32)."""
        if self._cast is None or self._cast[:2] != (device, dtype):
            self.master(device)
            self._cast = (device, dtype, *self._to(device, dtype))
        return self._cast[2:]

    def add_to_weight(self, w32: Tensor) -> None:
        """``w32 += B A + D`` in float32, in place."""
        pairs, dense, _ = self.master(w32.device)
        for down, up in pairs:
            w32.addmm_(up, down)
        if dense is not None:
            w32.add_(dense)

    def add_to_output(self, flat_x: Tensor, out: Tensor) -> Tensor:
        """``out + B (A x) + D x`` for ``flat_x [N, in]``, ``out [N, out]`` (in place unless autograd records)."""
        pairs, dense, _ = self.in_dtype(flat_x.device, flat_x.dtype)
        if torch.is_grad_enabled():
            for down, up in pairs:
                out = out + (flat_x @ down.t()) @ up.t()
            return out if dense is None else out + flat_x @ dense.t()
        for down, up in pairs:
            out.addmm_(flat_x @ down.t(), up.t())  # [N, r] @ [r, out]
        if dense is not None:
            out.addmm_(flat_x, dense.t())
        return out


class WorkBuffers:
    """Weight-sized work space shared by the live layers of one model set (they run one at a time).

    Building ``W + B A`` into a fresh tensor on every call would cost a large allocation per layer
    per step (on the CPU, fresh pages from the kernel each time); one buffer per (device, dtype),
    grown to the largest layer, is reused instead and dropped when the LoRAs are unloaded.
    """

    def __init__(self):
        self._bufs: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def get(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
        n = shape.numel()
        buf = self._bufs.get((device, dtype))
        if buf is None or buf.numel() < n:
            buf = self._bufs[(device, dtype)] = torch.empty(n, device=device, dtype=dtype)
        return buf[:n].view(shape)

    def clear(self) -> None:
        self._bufs.clear()


class LiveLinear:
    """The replacement ``forward`` of one Linear layer while LoRAs are live on it."""

    # "auto" picks by cost; tests and benchmarks may force "low_rank" or "merged".
    policy = "auto"

    def __init__(self, layer: torch.nn.Module, buffers: WorkBuffers | None = None):
        self.layer = layer
        self.buffers = buffers or WorkBuffers()
        self.deltas: list[LiveDelta] = []
        self.had_own_forward = "forward" in layer.__dict__
        self.previous = layer.forward

    def install(self) -> None:
        self.layer.forward = self

    def uninstall(self) -> None:
        if self.had_own_forward:
            self.layer.forward = self.previous
        else:
            del self.layer.forward

    def _merges(self, rows: int) -> bool:
        w = self.layer.weight
        if not w.is_floating_point() or self.policy == "low_rank":
            return False
        return self.policy == "merged" or rows * (w.shape[0] + w.shape[1]) > w.shape[0] * w.shape[1]

    def _bias_delta(self, device: torch.device) -> Tensor | None:
        biases = [d.master(device)[2] for d in self.deltas]
        biases = [b for b in biases if b is not None]
        return sum(biases[1:], biases[0]) if biases else None

    def __call__(self, x: Tensor) -> Tensor:
        w, b = self.layer.weight, self.layer.bias
        bias32 = self._bias_delta(x.device)
        if self._merges(x.numel() // x.shape[-1]):
            # parity: one fp32 sum, rounded once to w's dtype, as fuse does. Autograd keeps the
            # weight for the backward pass, so a recorded forward gets its own tensors.
            shared = not torch.is_grad_enabled()
            w32 = self.buffers.get(w.shape, w.device, torch.float32).copy_(w) if shared else w.float().clone()
            for d in self.deltas:
                d.add_to_weight(w32)
            if w.dtype != torch.float32:
                w32 = self.buffers.get(w.shape, w.device, w.dtype).copy_(w32) if shared else w32.to(w.dtype)
            if bias32 is not None:
                b = bias32.to(w.dtype) if b is None else (b.float() + bias32).to(b.dtype)
            return F.linear(x, w32, b)
        out = self.previous(x)
        shape = out.shape
        flat_out = out.reshape(-1, shape[-1])  # [N, out]
        flat_x = x.reshape(-1, x.shape[-1]).to(out.dtype)  # [N, in]
        for d in self.deltas:
            flat_out = d.add_to_output(flat_x, flat_out)
        if bias32 is not None:
            flat_out = flat_out + bias32.to(out.dtype)
        return flat_out.reshape(shape)
