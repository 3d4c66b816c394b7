"""LoRA costs on the CPU: fusing into a real-size A14B block, and the per-forward overhead of live mode.

    python -m bench.lora [--layers 2] [--repeats 3] [--threads N] [--out bench/out]

1. fuse: one A14B block (dim 5120, ffn 13824, 40 heads; random bf16 weights) and a rank-64 LoRA on
   its ten Linear layers. Times reading + checking the file, fusing (fp32 delta, cast back, originals
   copied for the exact unload) and unloading; extrapolates x40 to one expert.
2. live: a medium DiT (dim 1536, ffn 8960, 12 heads of 128, text_dim 4096; --layers blocks) on a
   5x40x64 latent (3200 tokens), fp32. One forward (a CFG step is two) with no LoRA vs live LoRAs
   of rank 32/64/128 on every block Linear, by the automatic formula and forced low rank. The
   variants are separate module trees sharing the same weight tensors, calls alternated, wall and
   CPU time both recorded.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from wanx.configs import DiTConfig
from wanx.lora import LoraStack
from wanx.lora.live import LiveLinear
from wanx.lora.reader import read_lora_file
from wanx.lora.stack import check_fit
from wanx.model import WanDiT

from .common import machine, randomize_

A14B = DiTConfig(model_type="t2v", in_dim=16, out_dim=16, dim=5120, ffn_dim=13824, num_heads=40, num_layers=1)
MEDIUM = DiTConfig(model_type="t2v", in_dim=16, out_dim=16, dim=1536, ffn_dim=8960, num_heads=12, num_layers=2,
                   text_dim=4096)
LATENT = (5, 40, 64)  # -> 5 x 20 x 32 = 3200 tokens
CTX_LEN = 80
LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
           "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def build(cfg: DiTConfig, dtype: torch.dtype) -> WanDiT:
    with torch.device("meta"):
        model = WanDiT(cfg)
    model = model.to_empty(device="cpu").to(dtype).eval()
    randomize_(model, seed=1)
    return model


def twin(model: WanDiT) -> WanDiT:
    """Another module tree on the very same weight tensors (hooks are per module object)."""
    with torch.device("meta"):
        other = WanDiT(model.cfg)
    other.load_state_dict(model.state_dict(), strict=True, assign=True)
    return other.eval()


def write_lora(model: WanDiT, rank: int, path: Path, dtype=torch.bfloat16) -> Path:
    """A kohya-style rank-``rank`` LoRA (alpha = rank / 2) on every block Linear."""
    g = torch.Generator().manual_seed(rank)
    sd = {}
    for i in range(model.cfg.num_layers):
        for name in LINEARS:
            out_dim, in_dim = model.get_parameter(f"blocks.{i}.{name}.weight").shape
            base = f"diffusion_model.blocks.{i}.{name}"
            sd[f"{base}.lora_down.weight"] = (torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5).to(dtype)
            sd[f"{base}.lora_up.weight"] = (0.01 * torch.randn(out_dim, rank, generator=g)).to(dtype)
            sd[f"{base}.alpha"] = torch.tensor(rank / 2)
    save_file(sd, str(path))
    return path


def merged_macs(cfg: DiTConfig, rank: int, ctx_len: int) -> float:
    """Multiply-adds of the auto live path per forward: B A built for the video-row layers (self q, k,
    v, o; cross q, o; ffn), low rank on the text rows of cross k, v."""
    d, f = cfg.dim, cfg.ffn_dim
    return cfg.num_layers * (6 * rank * d * d + 2 * rank * d * f + 2 * ctx_len * rank * 2 * d)


def lora_macs_per_token(cfg: DiTConfig, rank: int, ctx_len: int, tokens: int) -> float:
    """Multiply-adds the live LoRA adds per video token per forward (cross k/v run on the text rows)."""
    d, f = cfg.dim, cfg.ffn_dim
    video = 6 * rank * (d + d) + rank * (d + f) * 2  # self q,k,v,o + cross q,o; ffn.0 and ffn.2
    text = 2 * rank * (d + d) * ctx_len / tokens  # cross k, v on the (compacted) text rows
    return cfg.num_layers * (video + text)


# ------------------------------------------------------------------------------------ fuse

def _seconds(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def bench_fuse(workdir: Path, repeats: int) -> dict:
    """Read/check/fuse/unload times of a rank-64 LoRA on one real-size A14B block (bf16)."""
    model = build(A14B, torch.bfloat16)
    path = write_lora(model, 64, workdir / "a14b_block_rank64.safetensors")
    before = model.blocks[0].ffn[0].weight.detach().clone()
    steps = ("read", "check", "load", "unload")
    times = {clock: {k: [] for k in steps} for clock in ("wall", "cpu")}
    for _ in range(repeats):
        stack = LoraStack((model,))
        lora = read_lora_file(path)
        for step, fn in (("read", lambda: read_lora_file(path)), ("check", lambda: check_fit(lora, model)),
                         ("load", lambda: stack.load(path, mode="fuse")), ("unload", stack.unload_all)):
            wall, cpu = _seconds(fn)
            times["wall"][step].append(wall)
            times["cpu"][step].append(cpu)
    assert torch.equal(model.blocks[0].ffn[0].weight, before), "unload did not restore the weights"
    med = {c: {k: statistics.median(v) for k, v in t.items()} for c, t in times.items()}
    for m in med.values():
        m["fuse_only"] = m["load"] - m["read"] - m["check"]
    return {"what": "fuse a rank-64 LoRA into one A14B block (bf16 weights, bf16 LoRA)",
            "block_params": sum(p.numel() for p in model.blocks[0].parameters()),
            "lora_file_bytes": path.stat().st_size, "threads": torch.get_num_threads(),
            "median_s": med, "samples_s": times}


# ------------------------------------------------------------------------------------ live

def _forced(policy: str, fn):
    """Run ``fn`` with every live layer on one formula (the policy is read at call time)."""
    def run():
        LiveLinear.policy = policy
        try:
            return fn()
        finally:
            LiveLinear.policy = "auto"
    return run


def timed_rounds(fns: dict, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds per call, calls alternated as bench/common.py's ``interleaved``.

    On a machine shared with other jobs the wall clock also counts time spent descheduled; this
    process's CPU time does not, so its ratios are the steadier measure of extra work.
    """
    out = {"wall": {k: [] for k in fns}, "cpu": {k: [] for k in fns}}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            gc.collect()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            out["wall"][k].append(time.perf_counter() - w0)
            out["cpu"][k].append(time.process_time() - c0)
    return out


def _overheads(times: dict, key: str) -> dict:
    row = {}
    for clock, t in times.items():
        per_round = [a / b - 1 for a, b in zip(t[key], t["none"])]
        quartiles = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else [per_round[0]] * 3
        row[clock] = {"median_s": statistics.median(t[key]),
                      "overhead": statistics.median(t[key]) / statistics.median(t["none"]) - 1,
                      "overhead_per_round_median": statistics.median(per_round),
                      "overhead_per_round_iqr": [quartiles[0], quartiles[2]]}
    return row


VARIANTS = ((32, "auto"), (64, "auto"), (128, "auto"), (64, "low_rank"), (128, "low_rank"))


def bench_live(workdir: Path, layers: int, repeats: int) -> dict:
    """One forward of the medium DiT: no LoRA vs live LoRAs by rank and live formula."""
    from .dit import count_flops

    cfg = MEDIUM.replace(num_layers=layers)
    base = build(cfg, torch.float32)
    models = {}
    for r in sorted({r for r, _ in VARIANTS}):
        models[r] = twin(base)
        path = write_lora(base, r, workdir / f"medium_r{r}.safetensors", torch.float32)
        assert LoraStack((models[r],)).load(path, mode="live").experts[0].layers_live == 10 * layers
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, cfg.in_dim, *LATENT, generator=g)
    ctx = torch.randn(1, CTX_LEN, cfg.text_dim, generator=g)
    t = torch.tensor([937.0])

    def forward(model):
        with torch.no_grad():
            return model(x, t, ctx)
    fns = {"none": lambda: forward(base)}
    fns.update({f"rank {r} {p}": _forced(p, lambda m=models[r]: forward(m)) for r, p in VARIANTS})
    ref = fns["none"]()  # also the warm-up of every variant
    assert all(not torch.equal(fns[k](), ref) for k in fns if k != "none")
    times = timed_rounds(fns, repeats)
    tokens = LATENT[0] * (LATENT[1] // 2) * (LATENT[2] // 2)
    base_macs = count_flops(cfg, tokens, ctx_len=CTX_LEN + 1, batch=1) / 2
    rows = []
    for r, p in VARIANTS:
        extra = (merged_macs(cfg, r, CTX_LEN + 1) if p == "auto"
                 else lora_macs_per_token(cfg, r, CTX_LEN + 1, tokens) * tokens)
        rows.append({"rank": r, "path": p, "flop_overhead": extra / base_macs, **_overheads(times, f"rank {r} {p}")})
    return {"what": f"live LoRA, one forward, dim {cfg.dim}, {layers} block(s), {tokens} tokens, fp32, "
                    f"{torch.get_num_threads()} threads",
            "none_median_s": {c: statistics.median(v["none"]) for c, v in times.items()}, "samples_s": times,
            "rows": rows}


# ------------------------------------------------------------------------------------ main

def print_tables(fuse: dict | None, live: dict | None) -> None:
    if fuse:
        w, c = fuse["median_s"]["wall"], fuse["median_s"]["cpu"]
        print(f"\n{fuse['what']}: {fuse['block_params'] / 1e6:.0f}M params, LoRA file "
              f"{fuse['lora_file_bytes'] / 2**20:.1f} MiB, {fuse['threads']} threads")
        print("| step | one block, wall s | x40 = one expert, wall s | one block, CPU s |\n|---|---|---|---|")
        for step, label in (("read", "read file"), ("check", "check names + shapes"),
                            ("fuse_only", "fuse (fp32 sum, round once, keep original)"), ("load", "load total"),
                            ("unload", "unload (exact restore)")):
            print(f"| {label} | {w[step]:.3f} | {40 * w[step]:.1f} | {c[step]:.3f} |")
    if live:
        none = live["none_median_s"]
        print(f"\n{live['what']}: no LoRA {none['wall']:.2f} s wall, {none['cpu']:.2f} s CPU")
        print("| rank | live formula | extra FLOPs | CPU time: overhead | CPU: per round, median [IQR] "
              "| wall: overhead | wall: per round, median |")
        print("|---|---|---|---|---|---|---|")
        for r in live["rows"]:
            path = "auto (x (W + BA)^T)" if r["path"] == "auto" else "W x + B(A x)"
            cpu, wall = r["cpu"], r["wall"]
            lo, hi = cpu["overhead_per_round_iqr"]
            print(f"| {r['rank']} | {path} | {100 * r['flop_overhead']:.2f} % | {100 * cpu['overhead']:+.1f} % | "
                  f"{100 * cpu['overhead_per_round_median']:+.1f} % [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                  f"{100 * wall['overhead']:+.1f} % | {100 * wall['overhead_per_round_median']:+.1f} % |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1, help="blocks of the medium model (the overhead is per block)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", choices=["fuse", "live"], default=None)
    p.add_argument("--out", default="bench/out")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        fuse = bench_fuse(Path(work), args.repeats) if args.only in (None, "fuse") else None
        live = bench_live(Path(work), args.layers, args.repeats) if args.only in (None, "live") else None
    print_tables(fuse, live)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"meta": {"command": "python -m bench.lora " + shlex.join(argv if argv is not None else sys.argv[1:]),
                    "machine": machine()}, "fuse": fuse, "live": live}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in ("lora.json", f"lora-{stamp}.json"):
        (out / name).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwrote {out / 'lora.json'}")


if __name__ == "__main__":
    main()
