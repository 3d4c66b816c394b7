"""FSDP2 (``fully_shard``) for the DiT and umT5: one unit per block plus the root, as the official.

Loading never builds the whole model on a rank: the model is created on the meta device, sharded,
materialised empty, and each rank copies in only its rows of every tensor (FSDP2 shards dim 0 in
``torch.chunk`` pieces). From safetensors files the rows are read with ``get_slice`` and from
``.pth`` files through a memory map, so a rank reads about ``1 / world`` of the weights. A
diffusers-layout DiT folder needs its keys renamed first and is read whole (one rank's host RAM
holds it briefly, its GPU never does).

Unlike the official ``MixedPrecision(param_dtype=bf16)``, the parameters keep the dtype they are
loaded in (wanx's DiT dtype: bf16 on CUDA by default), so a sharded model computes exactly what
the unsharded one computes; ``param_dtype`` restores the official cast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..loading.safe import CheckpointError


def shard_blocks(model: nn.Module, mesh, *, param_dtype: torch.dtype | None = None,
                 reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each of ``model.blocks`` and then the root (in place; returns the model)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


class TensorSource:
    """Named tensors of a checkpoint, read a row range at a time when the file format allows it."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str, int, int], torch.Tensor]):
        self.shapes = shapes
        self._read = read

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 (the whole tensor for a 0-d one)."""
        return self._read(key, start, stop)

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "TensorSource":
        return cls({k: tuple(v.shape) for k, v in sd.items()},
                   lambda k, a, b: sd[k] if sd[k].dim() == 0 else sd[k][a:b])

    @classmethod
    def from_safetensors(cls, files: list[Path]) -> "TensorSource":
        from safetensors import safe_open

        handles, shapes = {}, {}
        for f in files:
            h = safe_open(str(f), framework="pt", device="cpu")
            for k in h.keys():
                handles[k] = h
                shapes[k] = tuple(h.get_slice(k).get_shape())

        def read(k, a, b):
            sl = handles[k].get_slice(k)
            return sl[:] if not shapes[k] else sl[a:b]

        return cls(shapes, read)


def dit_source(path: str | Path) -> TensorSource:
    """The official-key tensors of a DiT folder or file (row-range reads where possible)."""
    import json

    from ..loading.dit import WEIGHTS_STEM, read_dit_state_dict
    from ..loading.keymaps_dit import is_diffusers_keys

    path = Path(path)
    index = path / f"{WEIGHTS_STEM}.safetensors.index.json"
    files = ([path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
             if index.is_file() else [path / f"{WEIGHTS_STEM}.safetensors"])
    if path.is_dir() and all(f.is_file() for f in files):
        source = TensorSource.from_safetensors(files)
        if not is_diffusers_keys(source.shapes):
            return source
    return TensorSource.from_state_dict(read_dit_state_dict(path)[0])


def t5_source(path: str | Path) -> TensorSource:
    """The official-key tensors of a umT5 ``.pth`` (memory-mapped) or ``.safetensors`` file."""
    from ..loading.safe import load_pth

    path = Path(path)
    if path.suffix == ".safetensors":
        return TensorSource.from_safetensors([path])
    return TensorSource.from_state_dict(load_pth(path))


def load_shards(model: nn.Module, source: TensorSource, dtype: torch.dtype | None, what: str) -> None:
    """Copy this rank's rows of every parameter and buffer of a sharded, materialised ``model``."""
    from torch.distributed.tensor import DTensor, Shard

    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(source.shapes))
    unexpected = sorted(set(source.shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{what}: state dict does not match the model — missing {missing[:10]}, "
                              f"unexpected {unexpected[:10]}")
    with torch.no_grad():
        for key, target in expected.items():
            if tuple(target.shape) != source.shapes[key]:
                raise CheckpointError(f"{what}: {key} has shape {source.shapes[key]}, the model {tuple(target.shape)}")
            if isinstance(target, DTensor):
                if target.placements != (Shard(0),):
                    raise ValueError(f"{key}: only dim-0 sharding is loaded, got {target.placements}")
                local = target.to_local()
                n, world = target.shape[0], target.device_mesh.size()
                start = min(target.device_mesh.get_local_rank() * math.ceil(n / world), n)
                value = source.rows(key, start, start + local.shape[0])
            else:
                local, value = target, source.rows(key, 0, target.shape[0] if target.dim() else 0)
            local.copy_(value.to(dtype) if dtype is not None and value.is_floating_point() else value)
