"""Many processes on one generation: process groups, a device mesh and ``parallelize()``.

Applied to models from outside (design.md §4.8): Ulysses sequence parallelism, CFG-parallel and
FSDP2 sharding change neither the block code nor the state-dict keys. Importing this package
imports nothing heavy (names load their submodule on first use); the process group is joined by
:func:`init_process_group`.

- :mod:`.ulysses`, :mod:`.cfg`, :mod:`.fsdp`, :func:`parallelize`: act on one DiT (or umT5);
- :mod:`.launch`: one generation under torchrun (``wanx generate --ulysses_size N ...``);
- :mod:`.experts`: expert-parallel A14B, a two-stage pipeline over a queue of videos;
- :func:`run_local`: N local gloo processes (tests, CPU runs).
"""

from __future__ import annotations

import importlib

# Names -> submodules, imported on first use: ``wanx.distributed.flags`` (the CLI's flags) must stay
# importable without torch, and everything else here needs it.
_EXPORTS = {"apply_cfg_parallel": "cfg", "remove_cfg_parallel": "cfg", "ParallelConfig": "groups",
            "build_mesh": "groups", "check_parallel": "groups", "env_world": "groups",
            "init_process_group": "groups", "is_main_process": "groups", "world_mesh": "groups",
            "run_local": "local", "parallelize": "parallelize", "UlyssesAttention": "ulysses",
            "apply_ulysses": "ulysses", "remove_ulysses": "ulysses"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = ["ParallelConfig", "UlyssesAttention", "apply_cfg_parallel", "apply_ulysses", "build_mesh",
           "check_parallel", "env_world", "init_process_group", "is_main_process", "parallelize",
           "remove_cfg_parallel", "remove_ulysses", "run_local", "world_mesh"]
