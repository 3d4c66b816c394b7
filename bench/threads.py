"""CPU threading: demo-model generation time under OpenMP's wait policies, alone and beside a busy core.

    python bench/threads.py [--repeats 3] [--busy]

Each policy runs in a fresh interpreter (OMP_WAIT_POLICY is read once, when torch loads OpenMP).
With ``--busy`` a second process spins on one core, as on a shared machine. wanx sets PASSIVE by
default (``import wanx`` does ``setdefault``); this shows why. Prints a table, writes bench/out/threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
CHILD = r"""
import os, sys, time, json
import torch, wanx
pipe = wanx.load_pipeline(None, device="cpu")
pipe.generate("a red circle moving left", seed=1, progress=False)  # warm-up
times = []
for _ in range(int(sys.argv[1])):
    t = time.perf_counter()
    pipe.generate("a red circle moving left", seed=1, progress=False)
    times.append(time.perf_counter() - t)
print(json.dumps({"threads": torch.get_num_threads(), "seconds": times}))
"""


def run(policy: str | None, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    else:
        env["WANX_KEEP_OMP_DEFAULT"] = "1"  # measure OpenMP's own default, not wanx's
    out = subprocess.run([sys.executable, "-c", CHILD, str(repeats)], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    args = p.parse_args()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy else None
    try:
        rows = {name: run(policy, args.repeats) for name, policy in
                (("openmp default", None), ("ACTIVE", "ACTIVE"), ("PASSIVE (wanx)", "PASSIVE"))}
    finally:
        if spinner is not None:
            spinner.kill()
    print(f"{'policy':16s} {'threads':>7s} {'min s':>7s} {'median s':>9s}   (busy core: {args.busy})")
    for name, r in rows.items():
        s = sorted(r["seconds"])
        print(f"{name:16s} {r['threads']:7d} {s[0]:7.2f} {s[len(s) // 2]:9.2f}")
    OUT.mkdir(exist_ok=True)
    (OUT / "threads.json").write_text(json.dumps({"busy": args.busy, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
