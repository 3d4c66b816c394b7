"""``parallelize(model, mesh, config)``: every split of one DiT, applied from outside (torchtitan style).

Order as in the official ``_configure_model``: sequence parallelism first (it swaps the
self-attention class and sets the block runner), then CFG-parallel hooks, then FSDP2 wrapping.
"""

from __future__ import annotations

from torch import nn

from .cfg import apply_cfg_parallel
from .groups import ParallelConfig, world_mesh
from .ulysses import apply_ulysses


def parallelize(model: nn.Module, mesh, config: ParallelConfig, *, fsdp_mesh=None) -> nn.Module:
    """Apply ``config`` to a :class:`~wanx.model.WanDiT` over a ``("replica", "cfg", "ulysses")`` mesh.

    ``dit_fsdp`` shards the weights over ``fsdp_mesh`` (default: every rank of ``mesh``); the
    model must then be materialised and loaded with :mod:`wanx.distributed.fsdp`.
    """
    if config.ulysses_size > 1:
        apply_ulysses(model, mesh["ulysses"].get_group())
    if config.cfg_parallel:
        apply_cfg_parallel(model, mesh["cfg"].get_group())
    if config.dit_fsdp:
        from .fsdp import shard_blocks

        shard_blocks(model, fsdp_mesh if fsdp_mesh is not None else world_mesh(mesh.device_type))
    return model
