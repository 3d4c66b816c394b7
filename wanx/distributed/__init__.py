"""Many processes on one generation: process groups, a device mesh and ``parallelize()``.

Applied to models from outside (design.md §4.8): Ulysses sequence parallelism, CFG-parallel and
FSDP2 sharding change neither the block code nor the state-dict keys. Importing this package
imports torch but starts nothing; the process group is joined by :func:`init_process_group`.

- :mod:`.ulysses`, :mod:`.cfg`, :mod:`.fsdp`, :func:`parallelize`: act on one DiT (or umT5);
- :mod:`.launch`: one generation under torchrun (``wanx generate --ulysses_size N ...``);
- :mod:`.experts`: expert-parallel A14B, a two-stage pipeline over a queue of videos;
- :func:`run_local`: N local gloo processes (tests, CPU runs).
"""

from __future__ import annotations

from .cfg import apply_cfg_parallel, remove_cfg_parallel
from .groups import (ParallelConfig, build_mesh, check_parallel, env_world, init_process_group, is_main_process,
                     world_mesh)
from .local import run_local
from .parallelize import parallelize
from .ulysses import UlyssesAttention, apply_ulysses, remove_ulysses

__all__ = ["ParallelConfig", "UlyssesAttention", "apply_cfg_parallel", "apply_ulysses", "build_mesh",
           "check_parallel", "env_world", "init_process_group", "is_main_process", "parallelize",
           "remove_cfg_parallel", "remove_ulysses", "run_local", "world_mesh"]
