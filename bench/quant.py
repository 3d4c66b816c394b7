"""Weight-only quantization of the DiT: step time and weight memory per format vs the float model.

``python -m bench.quant [--size medium] [--repeats 3] [--threads N] [--out bench/out]``

One guided denoising step (``guided_velocity``: cond + uncond batched) of the same random-weight
DiT in fp32, bf16 storage, int8 and fp8 (per-channel, ``quantize_model_``) and GGUF Q8_0 and
Q4_K block Linears (the torch decoders of ``wanx.quant.ggml``). Every quantized variant
dequantizes its block weights on every call, the cost this measures. Calls are interleaved
(A B C ... then reversed), medians reported with the ratio to fp32; weight memory is what the
model stores (``wanx.quant.stored_bytes``); the error is the relative L2 error of the guided
velocity against fp32. Prints a table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from wanx.quant import QuantizedWeight, QuantLinear, quantize_model_, stored_bytes
from wanx.quant import ggml
from wanx.quant.linear import is_block_linear, set_submodule
from wanx.quant.tensor import GGMLCodec

from .common import SIZES, interleaved, machine
from .dit import build_wanx, make_inputs, wanx_step


def ggml_model(model: torch.nn.Module, ggml_type: int) -> torch.nn.Module:
    """A copy whose block Linears hold GGUF blocks of ``ggml_type`` (Q8_0 or Q4_K)."""
    encode = {ggml.Q8_0: ggml.quantize_q8_0, ggml.Q4_K: ggml.quantize_q4_k}[ggml_type]
    twin = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in twin.named_modules() if is_block_linear(n, m)]:
        w = layer.weight.detach()
        codec = GGMLCodec(encode(w), ggml_type)
        set_submodule(twin, name, QuantLinear(QuantizedWeight(codec, w.shape, w.dtype), layer.bias))
    return twin


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """fp32 (the model itself), then its quantized copies. bf16 computes in bf16 (storage and math).

    A GGUF type is left out when the model's rows are not whole blocks of it (Q4_K: 256 values).
    """
    out = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16),
           "int8": quantize_model_(copy.deepcopy(model), "int8"),
           "fp8": quantize_model_(copy.deepcopy(model), "fp8")}
    widths = {m.in_features for n, m in model.named_modules() if is_block_linear(n, m)}
    for name, ggml_type in (("gguf Q8_0", ggml.Q8_0), ("gguf Q4_K", ggml.Q4_K)):
        if all(w % ggml.BLOCK_SIZES[ggml_type][0] == 0 for w in widths):
            out[name] = ggml_model(model, ggml_type)
    return out


def block_linear_bytes(model: torch.nn.Module) -> int:
    return sum(stored_bytes(m) for n, m in model.named_modules()
               if is_block_linear(n, m) or (isinstance(m, QuantLinear) and n.startswith("blocks.")))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(size_name: str, repeats: int) -> dict:
    size = SIZES[size_name]
    model = build_wanx(size, "cpu")
    latent, t, ctx, ctx_null = make_inputs(size, "cpu")
    models = variants(model)
    steps = {k: wanx_step(m) for k, m in models.items()}
    outs = {k: s(latent, t, ctx, ctx_null) for k, s in steps.items()}  # also the warm-up call
    times = interleaved({k: (lambda s=s: s(latent, t, ctx, ctx_null)) for k, s in steps.items()},
                        repeats=repeats, warmup=0)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"format": k, "median_s": med[k], "ratio_vs_fp32": med[k] / med["fp32"],
             "weight_bytes": stored_bytes(m), "block_linear_bytes": block_linear_bytes(m),
             "rel_l2_vs_fp32": rel_l2(outs[k], outs["fp32"]), "samples_s": times[k]}
            for k, m in models.items()]
    return {"size": size_name, "dit": size.dit.to_dict(), "tokens": size.tokens, "ctx_lens": size.ctx_lens,
            "repeats": repeats, "rows": rows}


def table(result: dict) -> str:
    lines = [f"DiT guided step, size {result['size']} ({result['tokens']} tokens, CPU, "
             f"{torch.get_num_threads()} threads), median of {result['repeats']}",
             "| format | step s | vs fp32 | weights MiB | block Linears MiB | rel L2 vs fp32 |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['format']} | {r['median_s']:.3f} | {r['ratio_vs_fp32']:.2f} | "
                     f"{r['weight_bytes'] / 2**20:.1f} | {r['block_linear_bytes'] / 2**20:.1f} | "
                     f"{r['rel_l2_vs_fp32']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quant", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="medium", choices=["tiny", "medium"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="bench/out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.size, args.repeats)
    result["machine"] = machine()
    print(table(result))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"quant-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
