"""``wanx calibrate magcache``: flags (defined once, in :func:`add_calibrate_parser`) and the command.

    wanx calibrate magcache --out demo_ratios.json              # the built-in demo model
    wanx calibrate magcache --ckpt_dir Wan2.2-T2V-A14B --out t2v.json --sample_steps 40

(or ``python -m wanx.cache.command magcache ...`` where ``wanx calibrate`` is not wired). Every
argument is checked from flags and config files before a weight is read.
"""

from __future__ import annotations

import argparse
import sys

from ..configs import TASKS
from .calibrate import DEFAULT_PROMPT, DEMO_PROMPT, _checked_out, calibrate_request, write_ratios
from .ratios import RatioTable

# Argument -> the flag a user typed, for error messages (wanx.cli.FLAGS needs "out" and "cache" added).
FLAGS = {"prompt": "--prompt", "image": "--image", "size": "--size", "frame_num": "--frame_num",
         "sample_steps": "--sample_steps", "sample_shift": "--sample_shift", "guide_scale": "--sample_guide_scale",
         "sample_solver": "--sample_solver", "seed": "--base_seed", "out": "--out", "device": "--device",
         "dtype": "--dtype"}


def _guide(value: str):
    """'5.0' -> 5.0; '3.0,4.0' -> (3.0, 4.0), the official (low_noise, high_noise) pair."""
    try:
        parts = tuple(float(p) for p in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'low,high', got {value!r}") from None
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError("guide scale is one number or 'low,high'")
    return parts[0] if len(parts) == 1 else parts


def add_calibrate_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``calibrate`` to a ``wanx`` subparsers object; returns the new parser."""
    p = subparsers.add_parser("calibrate", help="measure step-cache data for a checkpoint (MagCache ratios)")
    p.add_argument("what", choices=["magcache"], help="what to calibrate: magcache (per-step magnitude ratios)")
    p.add_argument("--ckpt_dir", default=None, help="checkpoint folder; default: the built-in demo model")
    p.add_argument("--task", default=None, choices=sorted(TASKS), metavar="TASK",
                   help=f"one of {', '.join(TASKS)}; default: read from the checkpoint folder")
    p.add_argument("--out", required=True, help="ratios file to write (.json); use it as --cache magcache,ratios=FILE")
    p.add_argument("--prompt", default=None,
                   help=f"prompt of the calibration run (default: {DEMO_PROMPT!r} for the demo model, else "
                        f"{DEFAULT_PROMPT!r})")
    p.add_argument("--image", default=None, help="input image (i2v-A14B needs one; ti2v-5B's image mode)")
    p.add_argument("--size", default=None, help="W*H; default: the task's (measure at the size you generate)")
    p.add_argument("--frame_num", type=int, default=None, help="frames, 4n+1; default: the task's")
    p.add_argument("--sample_steps", type=int, default=None, help="denoising steps; default: the task's")
    p.add_argument("--sample_shift", type=float, default=None, help="schedule shift; default: the task's")
    p.add_argument("--sample_solver", default="unipc", help="solver (unipc, dpm++, euler); default unipc")
    p.add_argument("--sample_guide_scale", type=_guide, default=None,
                   help="guidance: one number or 'low,high'; default: the task's")
    p.add_argument("--base_seed", type=int, default=0, help="seed of the calibration run (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the device's)")
    p.add_argument("--allow_any_size", action="store_true", help="accept sizes outside the task's official list")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Run ``wanx calibrate magcache`` from parsed flags; returns the exit code."""
    from ..device import resolve_device, resolve_dtype
    from ..pipelines.loader import describe_checkpoint, load_pipeline
    from ..request import resolve_request

    out = _checked_out(args.out, args.overwrite)
    device = resolve_device(args.device)
    resolve_dtype(args.dtype, device)
    layout, facts = describe_checkpoint(args.ckpt_dir, args.task)
    prompt = args.prompt or (DEMO_PROMPT if args.ckpt_dir is None else DEFAULT_PROMPT)
    req = resolve_request(facts, prompt, None, args.image, args.size, args.frame_num, args.sample_steps,
                          args.sample_shift, args.sample_guide_scale, None, args.sample_solver, args.base_seed,
                          allow_any_size=args.allow_any_size)
    pipe = load_pipeline(layout.root, task=layout.spec.name, device=device, dtype=args.dtype)
    table = calibrate_request(pipe, req, source=out.name)
    write_ratios(table, out, args.overwrite)
    print(describe_table(table, str(out)))
    return 0


def describe_table(table: RatioTable, where: str) -> str:
    """One line: what was measured, the range of the ratios and the drop at the expert switch."""
    s = table.settings
    branches = "cond + uncond" if table.uncond is not None else "cond only (guidance 1)"
    rest = table.cond[1:]
    text = (f"wrote {where}: {table.steps} steps, {branches} ({s.get('task')}, {s.get('solver')} shift "
            f"{s.get('shift')}, {s.get('size')} x {s.get('frame_num')} frames); cond ratios "
            f"{min(rest, default=1.0):.4f}..{max(rest, default=1.0):.4f}")
    if table.switch_step is not None:
        text += f"; expert switch at step {table.switch_step}: {table.cond[table.switch_step]:.4f}"
    return text


def main(argv: list[str] | None = None) -> int:
    """``python -m wanx.cache.command magcache ...``: the command without the ``wanx`` front end."""
    from ..errors import InputError
    from ..loading.safe import CheckpointError

    parser = argparse.ArgumentParser(prog="wanx")
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["calibrate", *(sys.argv[1:] if argv is None else argv)])
    try:
        return cmd_calibrate(args)
    except (InputError, CheckpointError, FileExistsError, FileNotFoundError, IsADirectoryError,
            NotADirectoryError, PermissionError) as e:
        message = e.message_for(FLAGS) if isinstance(e, InputError) else str(e)
        print(f"wanx calibrate: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
