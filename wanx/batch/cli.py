"""The ``wanx batch`` subcommand: its flags and the function the CLI calls."""

from __future__ import annotations

import argparse

# Argument name -> flag, for InputError.message_for.
FLAGS = {"jobs": "JOBS", "ray": "--ray", "workers": "--workers"}


def add_batch_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobs", help="a .jsonl file: one JSON object per video (generate's arguments, plus id, "
                                "ckpt_dir, task)")
    p.add_argument("--out", required=True, help="output folder: <id>.mp4 + <id>.json, or <id>.error.json")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: alone, a cluster started on this machine; 'auto' or an address, "
                        "that cluster (needs the ray extra)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray actors (default: one per GPU, else one per --threads CPUs)")
    p.add_argument("--retries", type=int, default=2, help="re-runs of a job whose worker died")
    p.add_argument("--ckpt_dir", default=None, help="checkpoint for lines without ckpt_dir (default: the demo)")
    p.add_argument("--task", default=None, help="task for lines without task")
    p.add_argument("--device", default=None, help="in-process runs: cpu, cuda, cuda:N")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="DiT/text-encoder compute dtype: float32, bfloat16, float16 (default: per device)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per worker")
    p.add_argument("--offload_model", action="store_true", help="keep inactive models on the CPU")
    p.add_argument("--t5_cpu", action="store_true", help="run the text encoder on the CPU")


def cmd_batch(args) -> int:
    """Run the batch; exit code 0 when every job is done (or was already), 1 when some failed."""
    import sys

    from .runner import run_batch

    if args.workers is not None and args.workers < 1:
        from ..errors import InputError

        raise InputError("workers", f"{{arg}} must be at least 1, got {args.workers}")
    report = run_batch(args.jobs, args.out, ckpt_dir=args.ckpt_dir, task=args.task, ray_address=args.ray,
                       workers=args.workers, device=args.device, dtype=args.dtype, threads=args.threads,
                       retries=args.retries, offload_model=args.offload_model, t5_cpu=args.t5_cpu)
    print(f"{args.out}: {report.summary()}")
    for job_id, error in report.failed.items():
        print(f"  {job_id}: {error}", file=sys.stderr)
    return 1 if report.failed else 0
