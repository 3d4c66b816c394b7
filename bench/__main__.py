"""``python -m bench [--size tiny|medium|real] [--only dit,text,pipeline,ablate] [--repeats N] [--out DIR]``.

The VAE has its own script (subprocess per implementation for clean peak memory): ``python bench/vae.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from pathlib import Path

import torch

from .common import Report, machine, sizes_for, SIZES

PARTS = ("dit", "text", "pipeline", "ablate")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--size", default="tiny", choices=["tiny", "medium", "real", *SIZES])
    p.add_argument("--only", default="dit,text,pipeline", help=f"comma list of {','.join(PARTS)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/out")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--workdir", default="bench/out/work", help="where checkpoint folders are written")
    p.add_argument("--profile", default=None, choices=["wanx", "ref"], help="print a torch.profiler table "
                   "of one DiT step instead of benchmarking")
    p.add_argument("--compile", action="store_true", help="dit: also time wanx with torch.compile'd blocks")
    p.add_argument("--layers", type=int, default=None, help="override the DiT layer count (quicker ablations)")
    p.add_argument("--baseline-pkg", default=None, help="importable older wanx package timed in 'ablate'")
    p.add_argument("--mem-child", nargs=2, metavar=("PART", "IMPL"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    workdir = Path(args.workdir)

    if args.mem_child:  # internal: one fresh-process memory probe, prints one JSON line
        part, impl = args.mem_child
        size = SIZES[args.size]
        mod = importlib.import_module(f"bench.{part}")
        extra = {"workdir": workdir} if part == "pipeline" else {}
        print(json.dumps(mod.mem_child(size, impl, device, **extra)))
        return

    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        sys.exit(f"--only: unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}"
                 + (" (the VAE benchmark is `python bench/vae.py`)" if "vae" in unknown else ""))
    sizes = sizes_for(args.size)
    if args.layers:
        import dataclasses
        sizes = [dataclasses.replace(s, name=f"{s.name}-{args.layers}L", dit=s.dit.replace(num_layers=args.layers))
                 for s in sizes]
    if args.profile:
        from . import dit
        print(dit.profile(sizes[0], device, args.profile))
        return
    if any(s.dtype != torch.float32 for s in sizes) and device != "cuda":
        sys.exit(f"--size {args.size} is GPU only (bf16 at production sizes); no CUDA device here")

    report = Report(Path(args.out))
    meta = {"command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
            "machine": machine(), "device": device}
    print("| size | what | wanx s (median) | ref s (median) | wanx/ref | wanx peak / call | ref peak / call "
          "| call-mem ratio | max rel diff |\n|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for part in parts:
            # Memory children rebuild the named size, so a --layers override runs without them.
            mem = not args.no_mem and not args.layers and (size.dtype == torch.float32 or device == "cuda")
            if part == "ablate":
                from . import dit
                rows = dit.ablate(size, args.repeats, device, args.baseline_pkg)
            elif part == "pipeline":
                if size.name.startswith("real"):
                    print(f"(pipeline at {size.name}: not wired, the real VAE/umT5 need real checkpoints)")
                    continue
                from . import pipeline
                rows = pipeline.run(size, args.repeats, device, mem, workdir)
            elif part == "dit":
                from . import dit
                rows = dit.run(size, args.repeats, device, mem, compile=args.compile)
            else:
                mod = importlib.import_module(f"bench.{part}")
                rows = mod.run(size, args.repeats, device, mem)
            for row in rows:
                report.add(row)
    report.write(meta)
    print(f"wrote {report.out / 'results.json'} and {report.out / 'results.md'}")


if __name__ == "__main__":
    main()
