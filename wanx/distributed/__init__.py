"""Many processes on one generation: process groups, a device mesh and ``parallelize()``.

Applied to models from outside (design.md §4.8): Ulysses sequence parallelism, CFG-parallel and
FSDP2 sharding change neither the block code nor the state-dict keys. Importing this package
imports torch but starts nothing; the process group is joined by :func:`init_process_group`.
"""

from __future__ import annotations

from .groups import ParallelConfig, build_mesh, check_parallel, env_world, init_process_group, is_main_process
from .local import run_local
from .ulysses import UlyssesAttention, apply_ulysses, remove_ulysses

__all__ = ["ParallelConfig", "UlyssesAttention", "apply_ulysses", "build_mesh", "check_parallel", "env_world",
           "init_process_group", "is_main_process", "remove_ulysses", "run_local"]
