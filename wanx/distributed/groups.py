"""Process groups and the device mesh, set up from a ``torchrun`` environment.

The mesh has three named dimensions, ``("replica", "cfg", "ulysses")``: ranks of different
replicas compute the same thing (the official FSDP-only runs, where every rank holds a shard of
the weights but the whole sequence); the conditional and unconditional passes run on the two cfg
halves (CFG-parallel); inside each, the token sequence is split over ``ulysses`` ranks. The
Ulysses dimension is innermost, so a Ulysses group is a run of neighbouring ranks (one machine's
GPUs, where all-to-all is cheapest).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import InputError


@dataclass(frozen=True)
class ParallelConfig:
    """How one generation is split over the ranks (the official generate.py flag names)."""

    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def split_size(self) -> int:
        """Ranks that share one generation's work (the rest are replicas of them)."""
        return self.cfg_size * self.ulysses_size


def check_parallel(config: ParallelConfig, world_size: int, num_heads: int) -> None:
    """Refuse a split that cannot run, before any weight is read (``wanx.InputError``)."""
    if config.ulysses_size < 1:
        raise InputError("ulysses_size", f"{{arg}} must be >= 1, got {config.ulysses_size}")
    wanted = [name for name, on in (("ulysses_size", config.ulysses_size > 1), ("cfg_parallel", config.cfg_parallel),
                                    ("dit_fsdp", config.dit_fsdp), ("t5_fsdp", config.t5_fsdp)) if on]
    if world_size == 1 and wanted:
        raise InputError(wanted[0], "{arg} needs several processes; launch with torchrun --nproc_per_node N")
    if world_size % config.split_size:
        raise InputError("ulysses_size", f"{{arg}} {config.ulysses_size} x cfg {config.cfg_size} = "
                                         f"{config.split_size} ranks does not divide the {world_size} "
                                         f"processes launched")
    if num_heads % config.ulysses_size:
        good = [p for p in range(1, num_heads + 1) if num_heads % p == 0]
        raise InputError("ulysses_size", f"{{arg}} {config.ulysses_size} does not divide the model's "
                                         f"{num_heads} attention heads; use one of {good}")


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group(device: torch.device | str | None = None, timeout_s: float = 1800.0) -> torch.device:
    """Join the default group from the torchrun env (nccl on CUDA, gloo on CPU); returns this rank's device.

    On CUDA each process takes GPU ``LOCAL_RANK``. Calling it again is harmless.
    """
    _, world, local_rank = env_world()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if device.type == "cuda" else None)
    return device


def build_mesh(config: ParallelConfig, device: torch.device | str):
    """The ``("replica", "cfg", "ulysses")`` DeviceMesh over the whole default group."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if world % config.split_size:
        raise ValueError(f"{config.split_size} ranks per generation do not divide the world of {world}")
    shape = (world // config.split_size, config.cfg_size, config.ulysses_size)
    return init_device_mesh(torch.device(device).type, shape, mesh_dim_names=("replica", "cfg", "ulysses"))


def world_mesh(device: torch.device | str):
    """A one-dimensional mesh over every rank (FSDP shards over all of them, as the official code)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


def is_main_process() -> bool:
    """Rank 0, or any process outside a process group (it decodes, saves and prints)."""
    return not dist.is_initialized() or dist.get_rank() == 0
