"""Load the CLIP visual tower from ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``.

The file holds the whole XLM-RoBERTa CLIP (``visual.*``, ``textual.*``, ``log_scale``); Animate
uses the visual tower up to block 31. Every ``visual.`` tensor the model needs must be present
with the right shape; the ones it does not use are named explicitly below, so anything else in
the file (a different model) is an error rather than silently ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..configs import CLIPVisionConfig
from ..device import resolve_dtype
from ..vision.clip import CLIPVision
from .safe import CheckpointError, StateDict, build_on_meta, load_weights_file

CLIP_CHECKPOINT = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
PREFIX = "visual."
HEAD_WIDTH = 80  # 1280 / 16: the ViT-H/14 head width, used when the heads are not given


def _unused(key: str, cfg: CLIPVisionConfig) -> bool:
    """Tensors of the file Animate never reads: the text tower, the logit scale, the last block(s), the head."""
    if not key.startswith(PREFIX):
        return key == "log_scale" or key.startswith("textual.")
    rest = key[len(PREFIX):]
    m = re.match(r"transformer\.(\d+)\.", rest)
    return (m is not None and int(m.group(1)) >= cfg.use_layers) or rest == "head" or rest.startswith("post_norm.")


def clip_config_from_state_dict(sd: StateDict, num_heads: int | None = None, use_layers: int | None = None
                                ) -> CLIPVisionConfig:
    """Infer the visual tower's sizes from tensor shapes (heads: dim // 80 unless given)."""
    try:
        dim, _, patch, _ = sd[PREFIX + "patch_embedding.weight"].shape
        tokens = sd[PREFIX + "pos_embedding"].shape[1]
        hidden = sd[PREFIX + "transformer.0.mlp.0.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a CLIP checkpoint: no {e.args[0]}") from None
    layers = len({k.split(".")[2] for k in sd if k.startswith(PREFIX + "transformer.")})
    side = round((tokens - 1) ** 0.5)
    heads = num_heads or max(1, dim // HEAD_WIDTH)
    return CLIPVisionConfig(image_size=side * patch, patch_size=patch, dim=dim, mlp_ratio=hidden / dim,
                            num_heads=heads, num_layers=layers,
                            use_layers=layers - 1 if use_layers is None else use_layers)


def load_clip_visual(path: str | os.PathLike, *, config: CLIPVisionConfig | None = None,
                     dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> CLIPVision:
    """The visual tower from the official CLIP ``.pth`` (read with ``weights_only=True``) or a safetensors copy."""
    path = Path(path)
    sd = load_weights_file(path)
    cfg = config or clip_config_from_state_dict(sd)
    visual = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX) and not _unused(k, cfg)}
    foreign = sorted(k for k in sd if not k.startswith(PREFIX) and not _unused(k, cfg))
    if foreign:
        raise CheckpointError(f"CLIP {path}: unexpected keys outside visual./textual.: {foreign[:10]}")
    torch_dtype = None if dtype is None else resolve_dtype(dtype, torch.device(device))
    return build_on_meta(lambda: CLIPVision(cfg), visual, strict=True, dtype=torch_dtype, device=device,
                         what=f"CLIP {path}")
