"""The multi-process flags of ``wanx generate``, importable without torch (``wanx --help`` stays fast)."""

from __future__ import annotations

import argparse
import os

# Argument name -> CLI flag (for InputError.message_for).
FLAGS = {"ulysses_size": "--ulysses_size", "cfg_parallel": "--cfg_parallel", "dit_fsdp": "--dit_fsdp",
         "t5_fsdp": "--t5_fsdp", "expert_parallel": "--expert_parallel", "offload_model": "--offload_model",
         "lora": "--lora"}


def add_distributed_flags(p: argparse.ArgumentParser) -> None:
    """Add the flags (names as the official generate.py where it has them)."""
    p.add_argument("--ulysses_size", type=int, default=1,
                   help="split the video tokens over this many processes (Ulysses); must divide the head count")
    p.add_argument("--cfg_parallel", action="store_true",
                   help="conditional and unconditional passes on two halves of the processes")
    p.add_argument("--dit_fsdp", action="store_true", help="shard the DiT weights over all processes (FSDP2)")
    p.add_argument("--t5_fsdp", action="store_true", help="shard the text encoder over all processes (FSDP2)")
    p.add_argument("--expert_parallel", action="store_true",
                   help="A14B: each expert resident on one half of the processes (Ulysses inside each half)")


def distributed_requested(args) -> bool:
    """Whether ``wanx generate`` runs under torchrun or with any multi-process flag."""
    return (int(os.environ.get("WORLD_SIZE", 1)) > 1 or getattr(args, "ulysses_size", 1) > 1
            or any(getattr(args, f, False) for f in ("cfg_parallel", "dit_fsdp", "t5_fsdp", "expert_parallel")))
