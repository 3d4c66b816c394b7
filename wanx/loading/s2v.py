"""Load and save the S2V transformer in the official layout (``config.json`` with ``_class_name``
"WanModel_S2V" + ``diffusion_pytorch_model.safetensors`` or shards with an index).

diffusers has no S2V model, so there is no diffusers layout to read. Keys are the official ones
and the load is strict: a missing, unexpected or wrongly shaped tensor is an error naming it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..atomic import atomic_output
from ..configs import S2VConfig
from ..device import resolve_dtype
from ..model.s2v import WanS2VDiT, check_s2v_config
from .dit import WEIGHTS_STEM, _write_weights
from .safe import CheckpointError, build_on_meta, load_sharded_folder

OFFICIAL_S2V_CLASS = "WanModel_S2V"
# The official constructor's ignore_for_config: a real config.json never has these.
_NOT_IN_OFFICIAL_JSON = ("patch_size", "cross_attn_norm", "qk_norm", "text_dim", "window_size")


def s2v_config_from_json(d: Mapping[str, Any], source: str = "config.json") -> S2VConfig:
    """An :class:`S2VConfig` from an official ``WanModel_S2V`` config.json (types checked)."""
    cls = d.get("_class_name", OFFICIAL_S2V_CLASS)
    if cls != OFFICIAL_S2V_CLASS or d.get("model_type", "s2v") != "s2v":
        raise CheckpointError(f"{source}: not an S2V transformer (_class_name {cls!r}, model_type "
                              f"{d.get('model_type')!r}); expected {OFFICIAL_S2V_CLASS!r} / 's2v'")
    try:
        cfg = S2VConfig.from_dict(d, source=source)
        check_s2v_config(cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None
    return cfg


def s2v_config_to_json(cfg: S2VConfig) -> dict[str, Any]:
    """The config.json the official ``save_config`` writes, plus any ignored field that is not the default."""
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.to_dict().items()}
    default = S2VConfig().to_dict()
    out: dict[str, Any] = {"_class_name": OFFICIAL_S2V_CLASS, "_diffusers_version": "0.33.0"}
    out.update({k: v for k, v in d.items() if k not in _NOT_IN_OFFICIAL_JSON})
    out.update({k: d[k] for k in _NOT_IN_OFFICIAL_JSON if cfg.to_dict()[k] != default[k]})
    return out


def read_s2v_config(folder: str | os.PathLike) -> S2VConfig:
    """The folder's config.json as an :class:`S2VConfig` (reads no weights)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"S2V transformer config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return s2v_config_from_json(data, source=str(path))


def load_s2v(folder: str | os.PathLike, *, config: S2VConfig | None = None, dtype: torch.dtype | str | None = None,
             device: str | torch.device = "cpu", strict: bool = True) -> WanS2VDiT:
    """Build the S2V transformer of ``folder`` on the meta device and assign its weights (strict keys).

    ``dtype`` converts floating-point weights on load (None keeps the stored dtype).
    """
    cfg = config if config is not None else read_s2v_config(folder)
    sd = load_sharded_folder(folder, WEIGHTS_STEM)
    torch_dtype = None if dtype is None else resolve_dtype(dtype, torch.device(device))
    return build_on_meta(lambda: WanS2VDiT(cfg), sd, strict=strict, dtype=torch_dtype, device=device,
                         what=f"S2V transformer {folder}")


def save_s2v(model: WanS2VDiT, folder: str | os.PathLike, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as an official S2V folder (config.json + safetensors, sharded if asked)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(folder / "config.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(s2v_config_to_json(model.cfg), indent=2) + "\n")
    _write_weights(sd, folder, max_shard_bytes)
    return folder
