"""Safe tensor-file reading and meta-device model materialisation shared by every loader.

Weights come from safetensors, or from the official ``.pth`` files through
``torch.load(weights_only=True)``: a file that needs arbitrary unpickling is refused.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

StateDict = dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint file or folder is missing, incomplete, corrupt or unsafe."""


def load_pth(path: str | os.PathLike) -> StateDict:
    """Read an official ``.pth`` state dict with ``weights_only=True`` (never arbitrary pickles)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} is not a plain tensor checkpoint: it needs unpickling of arbitrary objects, "
            f"which wanx refuses for safety ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: it is corrupt or not a torch file ({e})") from None
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(obj)


def load_safetensors(path: str | os.PathLike) -> StateDict:
    """Read one safetensors file with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: corrupt or truncated safetensors file ({e})") from None


def load_weights_file(path: str | os.PathLike) -> StateDict:
    """A safetensors or official .pth file, chosen by extension."""
    path = Path(path)
    if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        return load_pth(path)
    return load_safetensors(path)


def load_sharded_folder(folder: str | os.PathLike, stem: str = "diffusion_pytorch_model") -> StateDict:
    """All tensors of ``<stem>.safetensors`` or of the shards listed in ``<stem>.safetensors.index.json``.

    Every shard named by the index must exist; the error names the missing ones.
    """
    folder = Path(folder)
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"malformed shard index {index}: {e}") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is incomplete: missing shard file(s) {', '.join(missing)}")
        sd: StateDict = {}
        for shard in shards:
            sd.update(load_safetensors(folder / shard))
        absent = sorted(set(weight_map) - set(sd))
        if absent:
            raise CheckpointError(f"shards in {folder} lack tensors listed in the index: {absent[:5]}")
        return sd
    if single.is_file():
        return load_safetensors(single)
    raise CheckpointError(f"{folder} has no weights: looked for {single.name} or {index.name}")


def check_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise naming the missing and unexpected keys and any shape mismatches."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(got)) if tuple(got[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:10]))
    if problems:
        raise CheckpointError(f"{what}: state dict does not match the model — " + " | ".join(problems))


def build_on_meta(factory: Callable[[], torch.nn.Module], state_dict: StateDict, *, strict: bool = True,
                  dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  what: str = "model") -> torch.nn.Module:
    """Build a module on the meta device and assign the checkpoint tensors (memory is never doubled).

    ``dtype`` converts floating-point tensors on load. Non-persistent buffers (RoPE tables etc.)
    are re-created on ``device`` by calling the module's ``reset_buffers()`` if it has one.
    """
    with torch.device("meta"):
        model = factory()
    expected = model.state_dict()
    if strict:
        check_keys(expected, state_dict, what)
    sd = {}
    for k, v in state_dict.items():
        if k not in expected:
            continue
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.to(device)
    model.load_state_dict(sd, strict=strict, assign=True)
    # Anything left on meta (non-strict loads, non-persistent buffers) must be materialised.
    if hasattr(model, "reset_buffers"):
        model.reset_buffers(torch.device(device))
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise CheckpointError(f"{what}: tensors not provided by the checkpoint: {leftovers[:10]}")
    return model.eval()
