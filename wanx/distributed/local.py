"""Run a function on N local processes joined in one gloo group (tests, benchmarks, CPU runs).

Each process gets the environment ``torchrun`` would give it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, MASTER_PORT), so the code under test takes the same set-up path as a
real launch. Nothing listens beyond the loopback interface.
"""

from __future__ import annotations

import os
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(local_rank: int, fn, world_size: int, port: int, threads: int, args: tuple) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)  # N processes share the cores: no oversubscription
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_local(fn, world_size: int, *args, timeout_s: float = 300.0, threads: int = 1) -> None:
    """Call ``fn(*args)`` in ``world_size`` spawned processes; raise if one fails or time runs out.

    ``fn`` must be importable by name (a module-level function). It joins the group itself, e.g.
    with :func:`wanx.distributed.init_process_group`. On a timeout every process is killed.
    """
    ctx = mp.spawn(_entry, args=(fn, world_size, free_port(), threads, args), nprocs=world_size,
                   join=False)
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} processes did not finish in {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
