"""Per-expert DiT single files (``dit_files``) with the text encoder, tokenizer and VAE of a folder.

The folder is an official-layout checkpoint, complete or without its DiT subfolders. Every
file is checked from its header before any weight is read: the count the task takes, the
architecture, and the model size: the folder's own expert ``config.json`` when it has one,
else the task's official model (a folder whose ``wanx.json`` sizes the T5/VAE itself is only
checked against those). Each error names the file.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from ..configs import DiTConfig, T5Config, TaskSpec, VAEConfig, get_task
from ..loading.dit import dit_config_from_json
from ..loading.layout import (WANX_JSON, CheckpointLayout, _apply_task_overrides, _config, read_json,
                              _read_wanx_json, _require)
from ..loading.safe import CheckpointError
from .dit import _file_shapes, dit_file_config

_TASK_BY_IN_DIM = {16: "t2v-A14B", 36: "i2v-A14B", 48: "ti2v-5B"}
_SIZE_FIELDS = ("in_dim", "out_dim", "dim", "ffn_dim", "num_layers", "text_dim", "freq_dim", "patch_size")


def as_file_list(dit_files) -> tuple[Path, ...]:
    """One path or a sequence of paths, each an existing file."""
    files = (dit_files,) if isinstance(dit_files, (str, os.PathLike)) else tuple(dit_files)
    files = tuple(Path(f) for f in files)
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"DiT file not found: {f}")
    return files


def _task(root: Path, task: str | None, extra: dict, first: Path) -> TaskSpec:
    name = task or extra.get("task", {}).get("base")
    if name is None:
        shape = _file_shapes(first).get("patch_embedding.weight")
        if shape is None or shape[1] not in _TASK_BY_IN_DIM:
            raise CheckpointError(f"cannot tell which task {first} is for; pass task=...")
        name = _TASK_BY_IN_DIM[shape[1]]
    spec = get_task(name)
    return _apply_task_overrides(spec, extra.get("task", {}), f"{root / WANX_JSON} [task]")


def _reference(root: Path, spec: TaskSpec, extra: dict) -> tuple[DiTConfig, str] | None:
    """The DiT size the files must have, and where it comes from (None: not known)."""
    folders = [root / d for d in spec.expert_dirs] if spec.is_moe else [root]
    for folder in folders:
        path = folder / "config.json"
        if path.is_file():
            return dit_config_from_json(read_json(path)), str(path)
    if "t5" in extra or "vae" in extra:
        return None  # a custom-size checkpoint without DiT configs: checked against T5/VAE only
    return spec.dit, f"the official {spec.name} model"


def _describe(cfg: DiTConfig) -> str:
    return f"{cfg.model_type} DiT of dim {cfg.dim}, ffn {cfg.ffn_dim}, {cfg.num_layers} layers, in/out {cfg.in_dim}/{cfg.out_dim}"


def _check_file(path: Path, cfg: DiTConfig, spec: TaskSpec, ref, t5: T5Config, vae: VAEConfig) -> None:
    if cfg.model_type != spec.dit.model_type:
        raise CheckpointError(f"{path} holds a {cfg.model_type} DiT (in_dim {cfg.in_dim}); task {spec.name} "
                              f"needs a {spec.dit.model_type} DiT (in_dim {spec.dit.in_dim})")
    if ref is not None and any(getattr(cfg, f) != getattr(ref[0], f) for f in _SIZE_FIELDS):
        raise CheckpointError(f"{path} is a model of another size: a {_describe(cfg)}; {ref[1]} is a "
                              f"{_describe(ref[0])}")
    if cfg.text_dim != t5.dim:
        raise CheckpointError(f"{path} takes text features of width {cfg.text_dim}; the checkpoint's umT5 "
                              f"gives {t5.dim}")
    if cfg.out_dim != vae.z_dim:
        raise CheckpointError(f"{path} predicts {cfg.out_dim} latent channels; the checkpoint's VAE has {vae.z_dim}")


def describe_dit_files(root: Path, task: str | None, dit_files) -> tuple[CheckpointLayout, DiTConfig]:
    """The layout (``dit_paths`` = the files) and the experts' DiTConfig, from headers and configs only."""
    files = as_file_list(dit_files)
    if not files:
        raise CheckpointError("dit_files is empty; give the DiT file(s) of the task")
    if (root / "model_index.json").is_file():
        raise CheckpointError(f"{root} is a diffusers folder; dit_files take the umT5, tokenizer and VAE "
                              f"of an official-layout folder")
    extra = _read_wanx_json(root)
    spec = _task(root, task, extra, files[0])
    want = 2 if spec.is_moe else 1
    if len(files) != want:
        order = " (high-noise expert first, then low-noise)" if spec.is_moe else ""
        raise CheckpointError(f"task {spec.name} takes {want} DiT file(s){order}; got {len(files)}: "
                              f"{', '.join(str(f) for f in files)}")
    t5 = _config(T5Config, extra["t5"], f"{root / WANX_JSON} [t5]", strict=True) if "t5" in extra else None
    vae = _config(VAEConfig, extra["vae"], f"{root / WANX_JSON} [vae]", strict=True) if "vae" in extra else None
    if vae is not None and vae.version != spec.vae_version:
        raise CheckpointError(f"{WANX_JSON} gives VAE version {vae.version} but task {spec.name} "
                              f"uses the Wan{spec.vae_version} VAE")
    _require([(root / spec.t5_checkpoint, "umT5 encoder weights"),
              (root / spec.t5_tokenizer / "tokenizer.json", "tokenizer"),
              (root / spec.vae_checkpoint, f"Wan{spec.vae_version} VAE weights")])
    ref = _reference(root, spec, extra)
    heads = ref[0].num_heads if ref is not None else None
    configs = [dit_file_config(f, num_heads=heads) for f in files]
    for f, cfg in zip(files, configs):
        _check_file(f, cfg, spec, ref, t5 or T5Config(), vae or _official_vae(spec))
    if len(set(configs)) > 1:
        raise CheckpointError(f"the DiT files are of different models: {files[0]} is a {_describe(configs[0])}, "
                              f"{files[1]} a {_describe(configs[1])}")
    if vae is not None and vae.strides != spec.vae_stride:
        spec = replace(spec, vae_strides=vae.strides)
    layout = CheckpointLayout(root=root, kind="official", spec=spec, tokenizer_dir=root / spec.t5_tokenizer,
                              t5_path=root / spec.t5_checkpoint, vae_path=root / spec.vae_checkpoint,
                              dit_paths=files, t5_config=t5, vae_config=vae, extra=extra)
    return layout, configs[0]


def _official_vae(spec: TaskSpec) -> VAEConfig:
    return VAEConfig.wan22() if spec.vae_version == "2.2" else VAEConfig.wan21()


__all__ = ["describe_dit_files", "as_file_list"]
