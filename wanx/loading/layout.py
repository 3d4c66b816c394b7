"""Recognise a checkpoint folder (official or diffusers) and list its component files.

Nothing heavy is read here: only small JSON files, so a CLI can check a folder completely
before any weights are loaded, and name every file that is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..configs import TASKS, T5Config, TaskSpec, VAEConfig, check_config_fields, get_task
from .safe import CheckpointError

WANX_JSON = "wanx.json"
DIT_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json")


@dataclass(frozen=True)
class CheckpointLayout:
    """Where each component of one checkpoint lives, and the task it runs."""

    root: Path
    kind: str  # "official" | "diffusers"
    spec: TaskSpec
    tokenizer_dir: Path
    t5_path: Path
    vae_path: Path
    dit_paths: tuple[Path, ...]  # (high_noise, low_noise) for MoE tasks, else (model,)
    t5_config: T5Config | None = None
    vae_config: VAEConfig | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _config(cls, data: Any, source: str, strict: bool = False):
    """``cls.from_dict`` with any problem reported as a CheckpointError naming ``source``."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source} must be a JSON object, got {type(data).__name__}")
    try:
        return cls.from_dict(data, strict=strict, source=source)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


def _check_boundary(value: Any, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise CheckpointError(f"{source}: boundary must be a number in [0, 1], got {value!r}")
    return float(value)


def _has_dit_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in DIT_WEIGHTS)


def _shard_files(folder: Path) -> list[tuple[Path, str]]:
    """The shards a sharded folder's index names, to be checked before any weight is read."""
    index = folder / DIT_WEIGHTS[1]
    if (folder / DIT_WEIGHTS[0]).is_file() or not index.is_file():
        return []
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index} has no 'weight_map' object")
    return [(folder / name, f"shard listed in {index.name}") for name in sorted(set(weight_map.values()))]


def _require(paths: list[tuple[Path, str]]) -> None:
    """Raise one error naming every missing file or folder (with what it is for)."""
    missing = [f"{p} ({what})" for p, what in paths if not p.exists()]
    if missing:
        raise CheckpointError("checkpoint folder is incomplete; missing:\n  " + "\n  ".join(missing))


TASK_OVERRIDES = ("supported_sizes", "default_size", "frame_num", "sample_steps", "sample_shift",
                  "guide_scale", "sample_fps", "boundary", "text_len", "negative_prompt")


def _apply_task_overrides(spec: TaskSpec, overrides: dict[str, Any], source: str) -> TaskSpec:
    """wanx.json may adjust the task's defaults (sizes, steps...) for non-standard models."""
    unknown = sorted(set(overrides) - set(TASK_OVERRIDES) - {"base"})
    if unknown:
        raise CheckpointError(f"{source}: unknown task field(s) {unknown}; known: base, {', '.join(TASK_OVERRIDES)}")
    kw = {k: v for k, v in overrides.items() if k != "base"}
    try:
        kw = check_config_fields(TaskSpec, kw, strict=True, source=source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if kw.get("boundary") is not None:
        _check_boundary(kw["boundary"], source)
    return replace(spec, **kw)


WANX_JSON_SECTIONS = ("t5", "vae", "task")


def _read_wanx_json(root: Path) -> dict[str, Any]:
    """wanx's own file: every section and key must be known (a typo is an error, not a silent default)."""
    path = root / WANX_JSON
    if not path.is_file():
        return {}
    extra = read_json(path)
    unknown = sorted(set(extra) - set(WANX_JSON_SECTIONS))
    if unknown:
        raise CheckpointError(f"{path}: unknown section(s) {unknown}; known: {', '.join(WANX_JSON_SECTIONS)}")
    if not isinstance(extra.get("task", {}), dict):
        raise CheckpointError(f"{path} [task] must be a JSON object")
    return extra


def _infer_official_task(root: Path) -> str:
    if (root / "high_noise_model").is_dir() or (root / "low_noise_model").is_dir():
        cfg_path = next((p for p in (root / "high_noise_model" / "config.json",
                                     root / "low_noise_model" / "config.json") if p.is_file()), None)
        in_dim = read_json(cfg_path).get("in_dim", 16) if cfg_path else 16
        return "i2v-A14B" if in_dim == 36 else "t2v-A14B"
    cfg = root / "config.json"
    if cfg.is_file():
        model_type = read_json(cfg).get("model_type")
        if model_type == "ti2v":
            return "ti2v-5B"
        if model_type == "s2v":
            return "s2v-14B"
    raise CheckpointError(f"cannot tell which task {root} holds: no high_noise_model/ or low_noise_model/ "
                          f"subfolder and no config.json with model_type 'ti2v'; pass task=...")


def _official_layout(root: Path, task: str | None) -> CheckpointLayout:
    extra = _read_wanx_json(root)
    task_over = extra.get("task", {})
    spec = get_task(task or task_over.get("base") or _infer_official_task(root))
    spec = _apply_task_overrides(spec, task_over, f"{root / WANX_JSON} [task]")
    if spec.is_moe:
        dit_paths = tuple(root / d for d in spec.expert_dirs)
    else:
        dit_paths = (root,)
    need = [(root / spec.t5_checkpoint, "umT5 encoder weights"),
            (root / spec.t5_tokenizer / "tokenizer.json", "tokenizer"),
            (root / spec.vae_checkpoint, f"Wan{spec.vae_version} VAE weights")]
    for d in dit_paths:
        need.append((d / "config.json", "diffusion transformer config"))
        if not _has_dit_weights(d):
            need.append((d / DIT_WEIGHTS[0], "diffusion transformer weights (or a sharded .index.json)"))
        need += _shard_files(d)
    _require(need)
    t5_cfg = _config(T5Config, extra["t5"], f"{root / WANX_JSON} [t5]", strict=True) if "t5" in extra else None
    vae_cfg = _config(VAEConfig, extra["vae"], f"{root / WANX_JSON} [vae]", strict=True) if "vae" in extra else None
    if vae_cfg is not None and vae_cfg.version != spec.vae_version:
        raise CheckpointError(f"{WANX_JSON} gives VAE version {vae_cfg.version} but task {spec.name} "
                              f"uses the Wan{spec.vae_version} VAE")
    if vae_cfg is not None and vae_cfg.strides != spec.vae_stride:
        spec = replace(spec, vae_strides=vae_cfg.strides)  # e.g. a VAE with fewer stages (demo model)
    return CheckpointLayout(root=root, kind="official", spec=spec,
                            tokenizer_dir=root / spec.t5_tokenizer, t5_path=root / spec.t5_checkpoint,
                            vae_path=root / spec.vae_checkpoint, dit_paths=dit_paths,
                            t5_config=t5_cfg, vae_config=vae_cfg, extra=extra)


def _infer_diffusers_task(root: Path, index: dict) -> str:
    tcfg_path = root / "transformer" / "config.json"
    if not tcfg_path.is_file():
        tcfg_path = root / "transformer_2" / "config.json"
    tcfg = read_json(tcfg_path) if tcfg_path.is_file() else {}
    in_ch = tcfg.get("in_channels", 16)
    if in_ch == 48 or index.get("expand_timesteps"):
        return "ti2v-5B"
    return "i2v-A14B" if in_ch == 36 else "t2v-A14B"


def _diffusers_layout(root: Path, task: str | None) -> CheckpointLayout:
    index = read_json(root / "model_index.json")
    spec = get_task(task or _infer_diffusers_task(root, index))
    if index.get("boundary_ratio") is not None:
        spec = replace(spec, boundary=_check_boundary(index["boundary_ratio"], f"{root / 'model_index.json'}"))
    _check_named_components(root, index)
    # diffusers: `transformer` is the high-noise expert, `transformer_2` the low-noise one.
    if spec.is_moe:
        dit_paths = tuple(root / d for d in ("transformer", "transformer_2") if (root / d).is_dir())
        if not dit_paths:
            dit_paths = (root / "transformer",)
    else:
        dit_paths = (root / "transformer",)
    need = [(root / "tokenizer" / "tokenizer.json", "tokenizer"),
            (root / "text_encoder" / "config.json", "text encoder config"),
            (root / "vae" / "config.json", "VAE config")]
    for d in dit_paths:
        need.append((d / "config.json", "diffusion transformer config"))
        if not _has_dit_weights(d):
            need.append((d / DIT_WEIGHTS[0], "diffusion transformer weights (or a sharded .index.json)"))
        need += _shard_files(d)
    _require(need)
    return CheckpointLayout(root=root, kind="diffusers", spec=spec, tokenizer_dir=root / "tokenizer",
                            t5_path=root / "text_encoder", vae_path=root / "vae", dit_paths=dit_paths,
                            extra={"model_index": index})


def _check_named_components(root: Path, index: dict) -> None:
    """Every model folder model_index.json names must exist (a missing transformer_2 would
    otherwise silently run the high-noise expert alone)."""
    for name in ("transformer", "transformer_2", "vae", "text_encoder", "tokenizer"):
        entry = index.get(name)
        named = isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] is not None
        if named and not (root / name).is_dir():
            raise CheckpointError(f"{root / 'model_index.json'} names {name!r} ({entry[1]}) but the folder "
                                  f"{root / name} is missing")


def find_checkpoint(ckpt_dir: str | Path, task: str | None = None) -> CheckpointLayout:
    """Inspect ``ckpt_dir`` (official or diffusers layout) and check that every component is there."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {root}")
    if task is not None and task not in TASKS:
        get_task(task)  # raises with the list of known tasks
    if task is not None and not TASKS[task].runnable:
        raise CheckpointError(f"task {task} is not runnable yet: {TASKS[task].note}")
    if (root / "model_index.json").is_file():
        layout = _diffusers_layout(root, task)
    else:
        layout = _official_layout(root, task)
    if not layout.spec.runnable:
        raise CheckpointError(f"task {layout.spec.name} is not runnable yet: {layout.spec.note}")
    return layout
