"""Load and save Wan DiT checkpoints in the official, diffusers and single-file layouts.

- official folder: ``config.json`` (``_class_name`` "WanModel") + ``diffusion_pytorch_model.safetensors``
  or shards with ``diffusion_pytorch_model.safetensors.index.json``; official keys.
- diffusers ``transformer/`` folder: same file names, ``WanTransformer3DModel`` config and keys.
- single file: one ``.safetensors`` (or ``.pth``) of official or diffusers keys, optionally prefixed
  with ``model.diffusion_model.``; the config is inferred from tensor shapes unless given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from ..configs import DiTConfig
from ..device import resolve_dtype
from ..model.dit import WanDiT
from .keymaps_dit import (diffusers_to_official, is_diffusers_keys, official_to_diffusers,
                          strip_single_file_prefix)
from .safe import CheckpointError, StateDict, build_on_meta, load_sharded_folder, load_weights_file

__all__ = ["load_dit", "save_dit", "official_to_diffusers", "diffusers_to_official", "strip_single_file_prefix",
           "dit_config_from_state_dict", "dit_config_from_json", "dit_config_to_json"]

WEIGHTS_STEM = "diffusion_pytorch_model"
OFFICIAL_CLASS = "WanModel"
DIFFUSERS_CLASS = "WanTransformer3DModel"
HEAD_DIM = 128  # every released Wan model
_MODEL_TYPES = {16: "t2v", 36: "i2v", 48: "ti2v"}
# The official ConfigMixin writes these (the constructor's ignore_for_config drops the rest).
_OFFICIAL_JSON_KEYS = ("model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim",
                       "num_heads", "num_layers", "eps")
# Not in real official config.json files; written by wanx only when they differ from the defaults.
_OFFICIAL_EXTRA_KEYS = ("text_dim", "patch_size", "qk_norm", "cross_attn_norm", "window_size")


# ---------------------------------------------------------------------------------------------- configs

def _model_type(in_dim: int, out_dim: int) -> str:
    return _MODEL_TYPES.get(in_dim, "i2v" if in_dim > out_dim else "t2v")


def dit_config_from_state_dict(sd: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                               **overrides: Any) -> DiTConfig:
    """Infer a DiTConfig from tensor shapes (official or diffusers keys); heads = dim // 128 unless given."""
    sd = diffusers_to_official(sd) if is_diffusers_keys(sd) else sd
    try:
        dim, in_dim, *patch = sd["patch_embedding.weight"].shape
        freq_dim = sd["time_embedding.0.weight"].shape[1]
        text_dim = sd["text_embedding.0.weight"].shape[1]
        ffn_dim = sd["blocks.0.ffn.0.weight"].shape[0]
        out_dim = sd["head.head.weight"].shape[0] // (patch[0] * patch[1] * patch[2])
    except KeyError as e:
        raise CheckpointError(f"not a Wan DiT state dict: no {e.args[0]}") from None
    num_layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if num_heads is None:
        if dim % HEAD_DIM:
            raise CheckpointError(f"cannot infer num_heads for dim={dim} (not a multiple of {HEAD_DIM}); "
                                  "pass num_heads=")
        num_heads = dim // HEAD_DIM
    cfg = DiTConfig(model_type=_model_type(in_dim, out_dim), patch_size=tuple(patch), in_dim=in_dim, dim=dim,
                    ffn_dim=ffn_dim, freq_dim=freq_dim, text_dim=text_dim, out_dim=out_dim, num_heads=num_heads,
                    num_layers=num_layers, qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
                    cross_attn_norm="blocks.0.norm3.weight" in sd)
    return cfg.replace(**overrides) if overrides else cfg


def dit_config_from_json(d: Mapping[str, Any]) -> DiTConfig:
    """A DiTConfig from an official (``WanModel``) or diffusers (``WanTransformer3DModel``) config.json."""
    cls = d.get("_class_name") or (DIFFUSERS_CLASS if "in_channels" in d else OFFICIAL_CLASS)
    if cls == DIFFUSERS_CLASS:
        return _config_from_diffusers_json(d)
    if cls != OFFICIAL_CLASS:
        raise CheckpointError(f"unsupported DiT class {cls!r} in config.json (wanx runs {OFFICIAL_CLASS} / "
                              f"{DIFFUSERS_CLASS})")
    return DiTConfig.from_dict(d)


def _config_from_diffusers_json(d: Mapping[str, Any]) -> DiTConfig:
    if d.get("image_dim") is not None or d.get("added_kv_proj_dim") is not None:
        raise CheckpointError("this diffusers Wan transformer has CLIP image cross-attention (Wan 2.1 I2V / "
                              "Animate), which the Wan 2.2 DiT does not have")
    defaults = DiTConfig()
    heads = d.get("num_attention_heads", 40)
    in_dim = d.get("in_channels", 16)
    out_dim = d.get("out_channels") or in_dim
    return DiTConfig(
        model_type=_model_type(in_dim, out_dim), patch_size=tuple(d.get("patch_size", defaults.patch_size)),
        in_dim=in_dim, out_dim=out_dim, dim=heads * d.get("attention_head_dim", HEAD_DIM), num_heads=heads,
        ffn_dim=d.get("ffn_dim", 13824), freq_dim=d.get("freq_dim", defaults.freq_dim),
        text_dim=d.get("text_dim", defaults.text_dim), num_layers=d.get("num_layers", 40),
        cross_attn_norm=d.get("cross_attn_norm", True), eps=d.get("eps", defaults.eps),
        # diffusers always builds the q/k RMSNorm, whatever its qk_norm field says.
        qk_norm=True)


def dit_config_to_json(cfg: DiTConfig, layout: str = "official") -> dict[str, Any]:
    """The config.json a real checkpoint of ``layout`` ("official" or "diffusers") carries."""
    if layout == "diffusers":
        return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": "0.35.0",
                "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
                "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
                "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
                "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
                "qk_norm": "rms_norm_across_heads", "eps": cfg.eps, "image_dim": None,
                "added_kv_proj_dim": None, "rope_max_seq_len": 1024, "pos_embed_seq_len": None}
    d = cfg.to_dict()
    out: dict[str, Any] = {"_class_name": OFFICIAL_CLASS, "_diffusers_version": "0.33.0"}
    out.update({k: d[k] for k in _OFFICIAL_JSON_KEYS})
    # A real official config.json cannot describe these; add them only when a default would be wrong.
    default = DiTConfig().to_dict()
    out.update({k: _jsonable(d[k]) for k in _OFFICIAL_EXTRA_KEYS if d[k] != default[k]})
    return out


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ---------------------------------------------------------------------------------------------- loading

def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _resolve_config(config: DiTConfig | Mapping[str, Any] | None) -> DiTConfig | None:
    if config is None or isinstance(config, DiTConfig):
        return config
    return dit_config_from_json(config)


def read_dit_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any] | None]:
    """The official-key state dict at ``path`` (folder or file) and the folder's config.json, if any."""
    path = Path(path)
    if path.is_dir():
        cfg_file = path / "config.json"
        json_cfg = _read_config_json(cfg_file) if cfg_file.is_file() else None
        sd = load_sharded_folder(path, WEIGHTS_STEM)
        diffusers = (json_cfg or {}).get("_class_name") == DIFFUSERS_CLASS or is_diffusers_keys(sd)
    else:
        json_cfg = None
        sd = strip_single_file_prefix(load_weights_file(path))
        diffusers = is_diffusers_keys(sd)
    return (diffusers_to_official(sd) if diffusers else sd), json_cfg


def load_dit(path: str | os.PathLike, *, config: DiTConfig | Mapping[str, Any] | None = None,
             dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu", strict: bool = True,
             num_heads: int | None = None) -> WanDiT:
    """Load a WanDiT from an official folder, a diffusers ``transformer/`` folder or a single file.

    ``config`` (DiTConfig or config.json dict) overrides the folder's config.json / shape inference;
    ``dtype`` converts floating-point weights on load (None keeps the stored dtype).
    """
    sd, json_cfg = read_dit_state_dict(path)
    cfg = _resolve_config(config)
    if cfg is None and json_cfg is not None:
        cfg = dit_config_from_json(json_cfg)
    if cfg is None:
        cfg = dit_config_from_state_dict(sd, num_heads=num_heads)
    elif num_heads is not None:
        cfg = cfg.replace(num_heads=num_heads)
    torch_dtype = None if dtype is None else resolve_dtype(dtype, torch.device(device))
    return build_on_meta(lambda: WanDiT(cfg), sd, strict=strict, dtype=torch_dtype, device=device,
                         what=f"DiT {path}")


# ---------------------------------------------------------------------------------------------- saving

def _shards(sd: StateDict, max_bytes: int) -> list[StateDict]:
    """Split ``sd`` in key order into pieces of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[StateDict] = [{}]
    size = 0
    for k, v in sd.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    return shards


def _clear_old_weights(folder: Path) -> None:
    # A stale single file next to a new index (or old shards) would make the folder ambiguous.
    for p in folder.glob(f"{WEIGHTS_STEM}*.safetensors*"):
        p.unlink()


def _write_weights(sd: StateDict, folder: Path, max_shard_bytes: int | None) -> None:
    _clear_old_weights(folder)
    if max_shard_bytes is None:
        save_file(sd, str(folder / f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})
        return
    shards = _shards(sd, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{WEIGHTS_STEM}-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{WEIGHTS_STEM}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_dit(model: WanDiT, path: str | os.PathLike, layout: str = "official",
             max_shard_bytes: int | None = None, prefix: str = "") -> Path:
    """Write ``model`` as an official or diffusers folder, or a single safetensors file; returns the path.

    ``max_shard_bytes`` shards folder layouts (with an index.json); ``prefix`` (e.g.
    ``"model.diffusion_model."``) is prepended to single-file keys.
    """
    if layout not in ("official", "diffusers", "single_file"):
        raise ValueError(f"layout must be 'official', 'diffusers' or 'single_file', got {layout!r}")
    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "single_file":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({prefix + k: v for k, v in sd.items()}, str(path), metadata={"format": "pt"})
        return path
    path.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        sd = official_to_diffusers(sd)
    (path / "config.json").write_text(json.dumps(dit_config_to_json(model.cfg, layout), indent=2) + "\n")
    _write_weights(sd, path, max_shard_bytes)
    return path
