"""Animate-14B's relighting LoRA (``relighting_lora.ckpt``), fused into the transformer's weights.

The official attaches it with PEFT (``LoraConfig(r=128, lora_alpha=128)``) to every ``nn.Linear``
under ``blocks`` except the face adapter's, and loads ``ckpt["state_dict"]`` with
``set_peft_model_state_dict``. Fusing ``W += (alpha / r) * B @ A`` gives the same map without
PEFT (no dropout at inference). The file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .safe import CheckpointError, StateDict, load_weights_file

RELIGHTING_LORA = "relighting_lora.ckpt"
LORA_ALPHA = 128.0  # the official get_loraconfig(alpha=128); not stored in the file
_PREFIXES = ("base_model.model.", "transformer.", "model.diffusion_model.")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")


def relighting_targets(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers the official LoRA config targets (name has 'blocks', not 'face' or 'modulation')."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "blocks" in name and "face" not in name and "modulation" not in name}


def lora_pairs(sd: StateDict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A [r, in], B [out, r])}`` from PEFT-style keys (``<module>.lora_A.weight``)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        m = _KEY.match(key)
        if m is None:
            raise CheckpointError(f"not a LoRA tensor: {key!r} (expected <module>.lora_A/.lora_B.weight)")
        parts.setdefault(m.group("module"), {})[m.group("part")] = value
    broken = sorted(k for k, v in parts.items() if set(v) != {"A", "B"})
    if broken:
        raise CheckpointError(f"LoRA modules without both lora_A and lora_B: {broken[:5]}")
    return {k: (v["A"], v["B"]) for k, v in parts.items()}


@torch.no_grad()
def fuse_relighting_lora(model: torch.nn.Module, path: str | os.PathLike, strength: float = 1.0) -> int:
    """Add ``strength * (alpha / r) * B @ A`` to every targeted linear weight; returns how many were changed.

    Every LoRA module must be a targeted linear of ``model`` with matching shapes (else an error
    naming it); targets the file does not cover are left as they are.
    """
    pairs = lora_pairs(load_weights_file(Path(path)))
    targets = relighting_targets(model)
    unknown = sorted(set(pairs) - set(targets))
    if unknown:
        raise CheckpointError(f"{path}: LoRA for modules the Animate model does not have (or the official "
                              f"config does not target): {unknown[:5]}")
    for name, (a, b) in pairs.items():
        layer = targets[name]
        rank = a.shape[0]
        if a.shape[1] != layer.in_features or b.shape != (layer.out_features, rank):
            raise CheckpointError(f"{path}: {name}: LoRA A {tuple(a.shape)} / B {tuple(b.shape)} do not fit "
                                  f"a {layer.in_features}->{layer.out_features} layer")
        delta = (b.float() @ a.float()) * (strength * LORA_ALPHA / rank)  # [out, in], in fp32
        layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    return len(pairs)
