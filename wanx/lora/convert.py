"""Write canonical LoRA entries in one of three spellings.

- ``comfy``: official module names prefixed ``diffusion_model.``, ``lora_down``/``lora_up`` +
  ``.alpha``, LightX2V ``.diff``/``.diff_b``/``.diff_m`` deltas, LyCORIS ``hada_*``/``lokr_*``:
  what ComfyUI, Wan2.2-Lightning, LightX2V and diffusers all read.
- ``official``: the same without the prefix (wanx's own canonical naming).
- ``diffusers``: ``transformer.`` + diffusers module names, PEFT ``lora_A``/``lora_B`` with the
  per-module ranks and alphas in the ``lora_adapter_metadata`` JSON, as ``save_lora_weights``
  writes it. PEFT has no spelling for whole-tensor deltas (except a Linear's bias next to its pair)
  or for LoHa/LoKr mixed with LoRA, so such files are refused rather than silently trimmed.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import torch

from ..loading.keymaps_dit import official_to_diffusers_key
from .entries import Entry, FullDelta, LoHa, LoKr, LowRank
from .errors import LoraError
from .reader import METADATA_KEY

TARGETS = ("diffusers", "comfy", "official")


def _diff_name(param: str) -> str:
    """LightX2V's delta names: ``M.weight`` -> ``M.diff``, ``.bias`` -> ``.diff_b``, ``.modulation`` -> ``.diff_m``."""
    for suffix, new in ((".weight", ".diff"), (".bias", ".diff_b"), (".modulation", ".diff_m")):
        if param.endswith(suffix):
            return param[: -len(suffix)] + new
    return param + ".diff"


def _alpha(scale: float, dim: int) -> torch.Tensor:
    # The file stores alpha; readers divide it by the rank again.
    return torch.tensor(scale * dim, dtype=torch.float32)


def _official_sd(entries: list[Entry], prefix: str) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for e in entries:
        base = prefix + e.module
        if isinstance(e, LowRank):
            sd[f"{base}.lora_down.weight"], sd[f"{base}.lora_up.weight"] = e.down, e.up
            if e.scale != 1.0:
                sd[f"{base}.alpha"] = _alpha(e.scale, e.rank)
        elif isinstance(e, LoHa):
            sd.update({f"{base}.hada_{n}": t for n, t in
                       (("w1_a", e.w1a), ("w1_b", e.w1b), ("w2_a", e.w2a), ("w2_b", e.w2b))})
            if e.scale != 1.0:
                sd[f"{base}.alpha"] = _alpha(e.scale, e.rank)
        elif isinstance(e, LoKr):
            sd.update({f"{base}.lokr_{n}": t for n, t in
                       (("w1", e.w1), ("w1_a", e.w1a), ("w1_b", e.w1b), ("w2", e.w2), ("w2_a", e.w2a),
                        ("w2_b", e.w2b)) if t is not None})
            if e.rank is not None and e.scale != 1.0:
                sd[f"{base}.alpha"] = _alpha(e.scale, e.rank)
        else:
            sd[prefix + _diff_name(e.param)] = e.tensor * e.scale if e.scale != 1.0 else e.tensor
    return sd


def _refuse_for_peft(entries: list[Entry]) -> None:
    pairs = {e.module for e in entries if isinstance(e, LowRank)}
    bad = [e.param for e in entries if isinstance(e, (LoHa, LoKr))
           or (isinstance(e, FullDelta) and not (e.param == f"{e.module}.bias" and e.module in pairs))]
    if bad:
        raise LoraError(f"the diffusers/PEFT format cannot hold {len(bad)} of these entries (LoHa/LoKr, or "
                        f"whole-tensor deltas such as {', '.join(bad[:4])}); convert --to comfy instead")


def _diffusers_sd(entries: list[Entry]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    _refuse_for_peft(entries)
    pairs = {e.module: e for e in entries if isinstance(e, LowRank)}
    names = {m: official_to_diffusers_key(m) for m in pairs}
    sd: dict[str, torch.Tensor] = {}
    for m, e in pairs.items():
        sd[f"transformer.{names[m]}.lora_A.weight"] = e.down
        sd[f"transformer.{names[m]}.lora_B.weight"] = e.up
    for e in entries:
        if isinstance(e, FullDelta):
            # PEFT multiplies lora_B's bias by the pair's scale, so store it divided by that scale.
            sd[f"transformer.{names[e.module]}.lora_B.bias"] = e.tensor * (e.scale / pairs[e.module].scale)
    ranks = {m: e.rank for m, e in pairs.items()}
    alphas = {m: e.scale * e.rank for m, e in pairs.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {"r": r, "lora_alpha": alpha, "target_modules": sorted(names.values()),
              "rank_pattern": {"^" + re.escape(names[m]): v for m, v in ranks.items() if v != r},
              "alpha_pattern": {"^" + re.escape(names[m]): v for m, v in alphas.items() if v != alpha},
              "lora_bias": any(isinstance(e, FullDelta) for e in entries), "use_dora": False, "use_rslora": False}
    metadata = {"format": "pt", METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    return {k: v.contiguous() for k, v in sd.items()}, metadata


def to_state_dict(entries: list[Entry], to: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) spelling ``entries`` in format ``to``."""
    if to not in TARGETS:
        raise LoraError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if to == "diffusers":
        return _diffusers_sd(entries)
    sd = _official_sd(entries, "diffusion_model." if to == "comfy" else "")
    return {k: v.contiguous() for k, v in sd.items()}, {"format": "pt"}
