"""Wan VAE speed and memory: wanx vs diffusers ``AutoencoderKLWan`` on the same random weights.

Each (implementation, operation) runs in its own subprocess so that peak memory is clean:
"peak MiB" is the process's peak resident set size during the operation minus its resident set
size just before it (Linux VmHWM, reset through /proc/self/clear_refs before the operation).
Times are wall seconds and process CPU seconds (the CPU-time ratio is steadier on a shared
machine). Both implementations get identical weights (a seeded wanx model, mapped to diffusers names) and
identical inputs; outputs are compared in the parent (max |diff|, fp32). Freed heap memory is
returned to the OS (malloc_trim) before the baseline is taken, and workers run with
MALLOC_MMAP_THRESHOLD_=1048576 so that large tensors are unmapped when freed: RSS then follows
live memory for both implementations.

    python bench/vae.py                          # 2.1 and 2.2, 17x256x256, encode + decode
    python bench/vae.py --version 2.2 --frames 5 --size 128 --ops decode
    python bench/vae.py --flops --frames 9 --size 64    # counted FLOPs of both (the "FLOP floor")
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python bench/vae.py`: make the `bench` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import malloc_trim, proc_status, reset_peak_rss  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "out"


def build_wanx(version: str, seed: int):
    """The seeded random-weight wanx model at real widths (norm gammas randomised too)."""
    from wanx.configs import VAEConfig
    from wanx.vae import WanVAE

    torch.manual_seed(seed)
    model = WanVAE(VAEConfig.wan21() if version == "2.1" else VAEConfig.wan22()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model.requires_grad_(False)


def build_diffusers(version: str, seed: int):
    from diffusers import AutoencoderKLWan

    from wanx.loading.vae import vae_official_to_diffusers

    ours = build_wanx(version, seed)
    cfg = ours.cfg
    kw = dict(base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample),
              latents_mean=list(cfg.mean), latents_std=list(cfg.std))
    if version == "2.2":
        kw.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    model = AutoencoderKLWan(**kw).eval()
    model.load_state_dict(vae_official_to_diffusers(ours.state_dict(), version), strict=True)
    return model.requires_grad_(False), cfg


def inputs(version: str, frames: int, size: int, seed: int):
    stride = 16 if version == "2.2" else 8
    z_dim = 48 if version == "2.2" else 16
    g = torch.Generator().manual_seed(seed + 1)
    video = torch.rand(1, 3, frames, size, size, generator=g) * 2 - 1
    latents = torch.randn(1, z_dim, (frames - 1) // 4 + 1, size // stride, size // stride, generator=g)
    return video, latents


def worker(args) -> None:
    """Run one (impl, op) and print a JSON line; the output tensor goes to ``args.save``."""
    torch.set_num_threads(args.threads)
    video, latents = inputs(args.version, args.frames, args.size, args.seed)
    if args.impl == "wanx":
        model = build_wanx(args.version, args.seed)
        if args.dtype == "bf16":
            model = model.to(torch.bfloat16)
        run = (lambda: model.encode(video)) if args.op == "encode" else (lambda: model.decode(latents))
    else:
        model, cfg = build_diffusers(args.version, args.seed)
        mean = torch.tensor(cfg.mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.std).view(1, -1, 1, 1, 1)
        if args.op == "encode":
            def run():
                return (model.encode(video).latent_dist.mode() - mean) / std
        else:
            def run():
                return model.decode(latents * std + mean).sample
    import gc

    gc.collect()
    malloc_trim()  # the diffusers worker freed a wanx model; its pages must not be reused "for free"
    base = proc_status("VmRSS") / 2**20
    clean = reset_peak_rss()
    with torch.no_grad():
        t0, c0 = time.perf_counter(), time.process_time()
        out = run()
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    peak = proc_status("VmHWM") / 2**20 - base
    torch.save(out.float().contiguous(), args.save)
    print(json.dumps(dict(seconds=seconds, cpu_seconds=cpu_seconds, peak_mib=peak, peak_clean=clean,
                          shape=list(out.shape))))


def flop_counts(version: str, frames: int, size: int, op: str) -> dict:
    """FLOPs (torch's FlopCounterMode: convs and matmuls) of one op in each implementation.

    wanx/diffusers of these counts is the lowest time ratio reachable at equal FLOP/s without
    changing the numbers; wanx's count is lower by the sub-pixel upsampling and the skipped
    zero-padding taps of the first causal chunk.
    """
    from torch.utils.flop_counter import FlopCounterMode

    video, latents = inputs(version, frames, size, 0)
    ours, (ref, _) = build_wanx(version, 0), build_diffusers(version, 0)
    calls = {"wanx": (lambda: ours.encode(video)) if op == "encode" else (lambda: ours.decode(latents)),
             "diffusers": (lambda: ref.encode(video).latent_dist.mode()) if op == "encode"
             else (lambda: ref.decode(latents).sample)}
    counts = {}
    for impl, call in calls.items():
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            call()
        counts[impl] = counter.get_total_flops()
    return dict(version=version, op=op, frames=frames, size=size, wanx_gflop=counts["wanx"] / 1e9,
                diffusers_gflop=counts["diffusers"] / 1e9, floor_ratio=counts["wanx"] / counts["diffusers"])


def run_one(args, impl: str, op: str, tmp: Path) -> dict:
    save = tmp / f"{impl}_{op}_{args_key(args)}.pt"
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--op", op, "--save", str(save),
           "--version", args.cur_version, "--frames", str(args.frames), "--size", str(args.size),
           "--seed", str(args.seed), "--threads", str(args.threads),
           "--dtype", args.dtype if impl == "wanx" else "fp32"]
    # Fixed mmap threshold: tensors >= 1 MiB are mmapped and unmapped on free, so RSS follows live
    # memory (glibc's dynamic threshold would keep freed blocks and blur the peak). Same for both.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576")
    res = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{impl} {op} failed:\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["output"] = str(save)
    return out


def args_key(args) -> str:
    return f"{args.cur_version}_{args.frames}x{args.size}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--version", choices=["2.1", "2.2", "both"], default="both")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--ops", default="encode,decode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="wanx compute dtype")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/out/vae-<time>.json)")
    p.add_argument("--flops", action="store_true", help="count FLOPs of both instead of timing")
    # internal: one measurement in a subprocess
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=["wanx", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--op", choices=["encode", "decode"], help=argparse.SUPPRESS)
    p.add_argument("--save", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.version = args.version if args.version != "both" else "2.1"
        return worker(args)

    versions = ["2.1", "2.2"] if args.version == "both" else [args.version]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if args.flops:
        torch.set_num_threads(args.threads)
        print("| VAE | op | clip | wanx GFLOP | diffusers GFLOP | FLOP floor (wanx/diffusers) |\n|---|---|---|---|---|---|")
        for version in versions:
            for op in ops:
                r = flop_counts(version, args.frames, args.size, op)
                print(f"| {version} | {op} | {args.frames}x{args.size}x{args.size} | {r['wanx_gflop']:.1f} | "
                      f"{r['diffusers_gflop']:.1f} | {r['floor_ratio']:.3f} |", flush=True)
        return None
    load = os.getloadavg()[0]
    print(f"Wan VAE bench: {args.frames}x{args.size}x{args.size}, {args.threads} threads, wanx {args.dtype}, "
          f"load avg {load:.1f} on {os.cpu_count()} CPUs; peak = RSS high-water mark during the op minus RSS before")
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for version in versions:
            args.cur_version = version
            for op in ops:
                d = run_one(args, "diffusers", op, tmp)
                w = run_one(args, "wanx", op, tmp)
                a, b = torch.load(w["output"]), torch.load(d["output"])
                row = dict(version=version, op=op, frames=args.frames, size=args.size,
                           wanx_s=w["seconds"], diffusers_s=d["seconds"], ratio=w["seconds"] / d["seconds"],
                           wanx_cpu_s=w["cpu_seconds"], diffusers_cpu_s=d["cpu_seconds"],
                           cpu_ratio=w["cpu_seconds"] / d["cpu_seconds"],
                           wanx_peak_mib=w["peak_mib"], diffusers_peak_mib=d["peak_mib"],
                           max_abs_diff=(a - b).abs().max().item(),
                           max_rel_diff=((a - b).abs().max() / b.abs().max()).item(), shape=w["shape"])
                rows.append(row)
                print(f"  {version} {op:6s}  wanx {row['wanx_s']:8.2f} s  diffusers {row['diffusers_s']:8.2f} s  "
                      f"ratio {row['ratio']:.2f} (CPU-time ratio {row['cpu_ratio']:.2f})  "
                      f"peak MiB wanx {row['wanx_peak_mib']:7.0f} / diffusers "
                      f"{row['diffusers_peak_mib']:7.0f}  max|diff| {row['max_abs_diff']:.2e} "
                      f"(rel {row['max_rel_diff']:.2e})", flush=True)
    print("\n| VAE | op | wanx s | diffusers s | ratio | CPU-s ratio | wanx peak MiB | diffusers peak MiB "
          "| max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['version']} | {r['op']} | {r['wanx_s']:.2f} | {r['diffusers_s']:.2f} | {r['ratio']:.2f} | "
              f"{r['cpu_ratio']:.2f} | {r['wanx_peak_mib']:.0f} | {r['diffusers_peak_mib']:.0f} | "
              f"{r['max_abs_diff']:.1e} |")
    out = args.out or OUT_DIR / f"vae-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(frames=args.frames, size=args.size, threads=args.threads, dtype=args.dtype, load_avg_start=load,
                load_avg_end=os.getloadavg()[0], torch=torch.__version__, cpu_count=os.cpu_count(),
                peak_memory="VmHWM during the op minus VmRSS before (per subprocess, after malloc_trim, "
                            "MALLOC_MMAP_THRESHOLD_=1048576)")
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
