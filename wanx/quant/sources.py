"""Full-precision DiT checkpoints read one tensor at a time (for quantizing without a float copy).

A source is an official or diffusers folder (one safetensors file or the shards its index
names) or a single ``.safetensors`` / ``.pth`` file; keys come out official.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from ..configs import DiTConfig
from ..loading.dit import DIFFUSERS_CLASS, WEIGHTS_STEM, dit_config_from_json
from ..loading.keymaps_dit import diffusers_to_official_key
from ..loading.safe import CheckpointError, load_pth
from .readers import _safe_open, official_namer

Tensor = torch.Tensor


def _folder_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} has no config.json (a DiT folder needs one)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _folder_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a DiT folder: the single file, or every shard its index names."""
    single = folder / f"{WEIGHTS_STEM}.safetensors"
    index = folder / f"{WEIGHTS_STEM}.safetensors.index.json"
    if single.is_file():
        return [single]
    if not index.is_file():
        raise CheckpointError(f"{folder} has no weights: looked for {single.name} or {index.name}")
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"malformed shard index {index}: {e}") from None
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise CheckpointError(f"{folder} is incomplete: missing shard file(s) {', '.join(missing)}")
    return [folder / s for s in shards]


def source_config(path: str | os.PathLike, num_heads: int | None = None) -> DiTConfig:
    """The DiTConfig of a source: its folder's config.json, or a single file's tensor shapes."""
    path = Path(path)
    if path.is_dir():
        cfg = dit_config_from_json(_folder_config(path))
        return cfg if num_heads is None else cfg.replace(num_heads=num_heads)
    from .dit import dit_file_config

    return dit_file_config(path, num_heads=num_heads)


def source_tensors(path: str | os.PathLike) -> Iterator[tuple[str, Tensor]]:
    """(official key, tensor) for every tensor of a full-precision DiT folder or file, one at a time."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"DiT checkpoint not found: {path}")
    if path.is_dir():
        diffusers = _folder_config(path).get("_class_name") == DIFFUSERS_CLASS
        for file in _folder_files(path):
            with _safe_open(file) as f:
                for key in f.keys():
                    yield (diffusers_to_official_key(key) if diffusers else key), f.get_tensor(key)
    elif path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
        sd = load_pth(path)  # memory-mapped: pages are read as each tensor is used
        name = official_namer(sd)
        for key, t in sd.items():
            yield name(key), t
    else:
        with _safe_open(path) as f:
            name = official_namer(f.keys())
            for key in f.keys():
                yield name(key), f.get_tensor(key)
