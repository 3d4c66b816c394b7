"""`wanx train demo`: train the built-in demo model (flags defined once, in :func:`add_train_flags`).

    wanx train demo --out wanx/demo/wanx-demo --work runs/demo --seed 0 --overwrite

(or ``python -m wanx.train.cli demo ...`` where the ``wanx train`` entry is not wired).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``wanx train``."""
    p.add_argument("what", choices=["demo"], help="what to train (only the built-in demo model so far)")
    p.add_argument("--out", default="wanx/demo/wanx-demo", help="checkpoint folder to write (official layout)")
    p.add_argument("--work", default="runs/demo", help="folder for checkpoints, logs, latent cache, loss curve")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw of the run (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1 ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE optimiser steps (default: recipe)")
    p.add_argument("--decoder-steps", type=int, default=None,
                   help="decoder fine-tuning steps, encoder frozen (default: recipe; 0 skips the stage)")
    p.add_argument("--dit-steps", type=int, default=None, help="DiT optimiser steps (default: recipe)")
    p.add_argument("--minutes-vae", type=float, default=0.0, help="wall-time cap of the VAE stage (0: none)")
    p.add_argument("--minutes-dit", type=float, default=0.0, help="wall-time cap of the DiT stage (0: none)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints in --work")
    p.add_argument("--overwrite", action="store_true",
                   help="allow replacing a non-empty --out folder and starting over in a used --work folder")
    p.add_argument("--stop-after", default="export", choices=["vae", "decoder", "stats", "cache", "dit", "export"],
                   help="stop after this stage")
    p.add_argument("--smoke", action="store_true", help="seconds-sized recipe (16 px, 5 frames) for tests")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def cmd_train(args) -> int:
    """Run ``wanx train`` from parsed flags; returns the exit code."""
    import torch

    from .demo import DemoRecipe, check_run_paths, run_demo

    try:  # before any training: an unusable or unasked-for replacement of --out / --work
        check_run_paths(Path(args.out), Path(args.work), resume=args.resume, overwrite=args.overwrite)
    except (FileExistsError, NotADirectoryError) as e:
        print(f"wanx train: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = DemoRecipe.smoke() if args.smoke else DemoRecipe.full()
    over = {k: v for k, v in (("vae_steps", args.vae_steps), ("decoder_steps", args.decoder_steps),
                              ("dit_steps", args.dit_steps)) if v is not None}
    recipe = dataclasses.replace(recipe, **over)
    summary = run_demo(recipe, Path(args.out), Path(args.work), seed=args.seed, device=args.device,
                       minutes_vae=args.minutes_vae, minutes_dit=args.minutes_dit, resume=args.resume,
                       stop_after=args.stop_after, progress=not args.no_progress,
                       overwrite=args.overwrite)
    stages = summary.get("stages", {})
    for name, info in stages.items():
        secs = info.get("seconds")
        print(f"{name:>6}: " + (f"{secs / 60:.1f} min" if secs is not None else "") +
              (f", {info['steps']} steps" if "steps" in info else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="wanx train", description=__doc__.split("\n\n")[0])
    add_train_flags(p)
    return cmd_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
