"""Read a LoRA file of any supported format into canonical entries keyed by official module name.

Formats: diffusers/PEFT (``transformer.blocks.N.attn1.to_q.lora_A.weight``, alphas from the
``lora_adapter_metadata`` JSON), kohya/musubi (``lora_unet_blocks_N_self_attn_q.lora_down.weight``
+ ``.alpha``; also ``lora_unet__`` and the dotted hybrid), official names with or without the
``diffusion_model.`` / ``model.diffusion_model.`` prefix in ``lora_A/B`` or ``lora_down/up``
spelling (``.default.`` adapter names too), LightX2V full deltas (``.diff``, ``.diff_b``,
``.diff_m``), LyCORIS LoHa (``hada_w1_a`` ...) and LoKr (``lokr_w1`` ...).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..loading.safe import CheckpointError, load_weights_file
from .entries import Entry, FullDelta, LoHa, LoKr, LowRank
from .errors import LoraError
from .names import KeySpace, diffusers_to_official_path, is_diffusers_path

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
KOHYA_PREFIX = "lora_unet_"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
METADATA_KEY = "lora_adapter_metadata"

# Longest first where one suffix ends another. Every up/down spelling peers accept.
_ROLE_SUFFIXES = (
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),
    (".lora.A.weight", "down"), (".lora.B.weight", "up"),
    (".lora_A", "down"), (".lora_B", "up"),
    (".lora_B.bias", "bias"), (".alpha", "alpha"),
    (".diff_b", "diff_b"), (".diff_m", "diff_m"), (".diff", "diff"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"), (".hada_w2_b", "hada_w2_b"),
    (".lokr_w1_a", "lokr_w1_a"), (".lokr_w1_b", "lokr_w1_b"), (".lokr_w1", "lokr_w1"),
    (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"), (".lokr_w2", "lokr_w2"),
)
_UNSUPPORTED = (
    (".dora_scale", "DoRA magnitude (not supported)"),
    (".lora_magnitude_vector.weight", "DoRA magnitude (not supported)"),
    (".lora_magnitude_vector", "DoRA magnitude (not supported)"),
    (".lora_mid.weight", "LoCon Tucker mid factor (not supported)"),
    (".hada_t1", "LoHa Tucker factor (convolutions; not supported)"),
    (".hada_t2", "LoHa Tucker factor (convolutions; not supported)"),
    (".lokr_t2", "LoKr Tucker factor (convolutions; not supported)"),
    (".set_weight", "weight replacement (not supported)"),
)
# Which parameter of the module each role changes (see KeySpace.resolve).
_TARGET = {"bias": "bias", "diff": "self", "diff_b": "bias", "diff_m": "modulation"}
_DEFAULT_ADAPTER = re.compile(r"\.default(?=\.(weight|bias)$)")


@dataclass(frozen=True)
class LoraFile:
    """One LoRA file as read from disk: its tensors, safetensors metadata and sha256."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    sha256: str


@dataclass
class LoraContents:
    """A file normalised against one model's key space."""

    format: str
    entries: list[Entry] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # keys of Wan modules this model lacks
    out_of_range: list[str] = field(default_factory=list)  # keys of blocks past the model's last
    unknown: dict[str, str] = field(default_factory=dict)  # key -> why it is not understood


@dataclass(frozen=True)
class _Key:
    key: str  # as in the file
    path: str  # module path as written (prefix stripped), for PEFT metadata patterns
    official: str | None  # official module path (None: could not be read)
    role: str
    prefixed: bool


# ------------------------------------------------------------------------------------ reading

def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def read_lora_file(path: str | os.PathLike) -> LoraFile:
    """Read ``path`` (safetensors; ``.pt/.pth/.ckpt/.bin`` only as plain tensors, never pickles)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    try:
        tensors = load_weights_file(path)
        metadata = {} if path.suffix in PICKLE_SUFFIXES else _safetensors_metadata(path)
    except CheckpointError as e:
        raise LoraError(f"unusable LoRA file: {e}") from None  # the message names the file
    if not tensors:
        raise LoraError(f"LoRA file {path} holds no tensors")
    return LoraFile(path, tensors, metadata, sha256_of(path))


def peft_metadata(metadata: dict[str, str], path: Path | str = "") -> dict:
    """The PEFT LoraConfig dict diffusers stores in the safetensors metadata ({} when absent)."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraError(f"LoRA file {path}: malformed {METADATA_KEY} JSON ({e})") from None
    # Pipeline-level saves prefix every field with the component name.
    if any(k.startswith("transformer.") for k in cfg):
        cfg = {k[len("transformer."):]: v for k, v in cfg.items() if k.startswith("transformer.")}
    if cfg.get("use_dora"):
        raise LoraError(f"LoRA file {path} is a DoRA adapter (use_dora in its metadata); wanx does not apply DoRA")
    return cfg


# ------------------------------------------------------------------------------------ key parsing

def _split_role(key: str) -> tuple[str, str] | tuple[None, str]:
    """(module path, role) or (None, reason)."""
    key = _DEFAULT_ADAPTER.sub("", key)
    for suffix, reason in _UNSUPPORTED:
        if key.endswith(suffix):
            return None, reason
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None, "not a LoRA tensor name"


def _strip_prefix(path: str) -> tuple[str, bool]:
    for prefix in PREFIXES:
        if path.startswith(prefix):
            return path[len(prefix):], True
    return path, False


def _parse_keys(tensors: dict[str, torch.Tensor], space: KeySpace) -> tuple[list[_Key], dict[str, str], str]:
    """Every key as (official path, role); the keys that are no LoRA tensor; the naming used."""
    split, unknown = [], {}
    for key in tensors:
        path, role = _split_role(key)
        if path is None:
            unknown[key] = role
            continue
        path, prefixed = _strip_prefix(path)
        split.append((key, path, role, prefixed))
    dotted = [p for _, p, _, _ in split if not p.startswith(KOHYA_PREFIX)]
    naming = "diffusers" if any(is_diffusers_path(p) for p in dotted) else "official"
    keys = []
    for key, path, role, prefixed in split:
        if path.startswith(KOHYA_PREFIX):
            # lora_unet__ (Wan-Fun) and the dotted hybrid both reduce to the plain kohya name.
            official = space.kohya_path(path[len(KOHYA_PREFIX):].lstrip("_").replace(".", "_"))
        elif naming == "diffusers":
            official = diffusers_to_official_path(path)
        else:
            official = path
        keys.append(_Key(key, path, official, role, prefixed))
    return keys, unknown, naming


def _format_label(keys: list[_Key], naming: str) -> str:
    roles = {k.role for k in keys}
    if any(k.key.startswith(KOHYA_PREFIX) for k in keys):
        label = "kohya"
        if any(k.key.startswith(KOHYA_PREFIX + "_") for k in keys):
            label += " (Wan-Fun lora_unet__)"
        elif any("." in k.path[len(KOHYA_PREFIX):] for k in keys if k.path.startswith(KOHYA_PREFIX)):
            label += " (hybrid dotted)"
    elif naming == "diffusers":
        label = "diffusers/PEFT"
    elif any(k.prefixed for k in keys):
        label = "lightx2v" if roles & {"diff", "diff_b", "diff_m"} else "comfy"
    else:
        label = "official"
    families = [name for name, tag in (("LoHa", "hada_"), ("LoKr", "lokr_")) if any(r.startswith(tag) for r in roles)]
    return label + "".join(f" + {f}" for f in families)


# ------------------------------------------------------------------------------------ assembly

def _alpha_value(t: torch.Tensor, key: str) -> float:
    if t.numel() != 1:
        raise LoraError(f"{key}: alpha must be a single number, got shape {tuple(t.shape)}")
    return float(t.float().item())


def _pattern_value(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches a whole module path or its dotted tail."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def _lowrank_scale(alpha: float | None, rank: int, peft: dict, path: str) -> tuple[float, float | None]:
    """(scale, alpha): ``.alpha`` key first, else the PEFT metadata, else alpha = rank (scale 1)."""
    rslora = False
    if alpha is None and peft:
        alpha = _pattern_value(peft.get("alpha_pattern") or {}, path, peft.get("lora_alpha"))
        rslora = bool(peft.get("use_rslora"))
    # kohya/musubi: a zero alpha means "unset" (alpha = rank); nobody ships a LoRA scaled to zero.
    if not alpha:
        return 1.0, None
    return (alpha / math.sqrt(rank) if rslora else alpha / rank), float(alpha)


def _check_pair(module: str, down, up, keys) -> None:
    if down is None or up is None:
        raise LoraError(f"incomplete LoRA pair for {module}: has {', '.join(sorted(keys))} but "
                        f"no {'up (lora_B/lora_up)' if up is None else 'down (lora_A/lora_down)'} matrix")
    ok_dims = down.dim() == up.dim() and down.dim() in (2, 3, 4, 5)
    ok_up = ok_dims and all(s == 1 for s in up.shape[2:])
    if not ok_up:
        raise LoraError(f"LoRA pair for {module} has unusable shapes: down {tuple(down.shape)}, up {tuple(up.shape)}")
    if down.shape[0] != up.shape[1]:
        raise LoraError(f"rank mismatch in the LoRA pair for {module}: down has rank {down.shape[0]} "
                        f"{tuple(down.shape)}, up has rank {up.shape[1]} {tuple(up.shape)}")


def _build_lora(module: str, got: dict, peft: dict, path: str) -> list[Entry]:
    down = got["down"][1] if "down" in got else None
    up = got["up"][1] if "up" in got else None
    _check_pair(module, down, up, [k for k, _ in got.values()])
    alpha = _alpha_value(got["alpha"][1], got["alpha"][0]) if "alpha" in got else None
    scale, alpha = _lowrank_scale(alpha, down.shape[0], peft, path)
    out: list[Entry] = [LowRank(module, down, up, scale, alpha)]
    if "bias" in got:
        # PEFT computes lora_B(lora_A(x)) * scaling, so lora_B's bias is scaled with the pair.
        out.append(FullDelta(module, f"{module}.bias", got["bias"][1], scale))
    return out


def _build_loha(module: str, got: dict) -> Entry:
    need = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    missing = [n for n in need if n not in got]
    if missing:
        raise LoraError(f"incomplete LoHa factors for {module}: missing {', '.join(missing)}")
    w1a, w1b, w2a, w2b = (got[n][1] for n in need)
    if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or w1a.shape[1] != w1b.shape[0] \
            or w2a.shape[1] != w2b.shape[0] or (w1a.shape[0], w1b.shape[1]) != (w2a.shape[0], w2b.shape[1]):
        raise LoraError(f"LoHa factors for {module} do not fit together: "
                        + ", ".join(f"{n} {tuple(got[n][1].shape)}" for n in need))
    alpha = _alpha_value(got["alpha"][1], got["alpha"][0]) if "alpha" in got else None
    scale = alpha / w1b.shape[0] if alpha else 1.0
    return LoHa(module, w1a, w1b, w2a, w2b, scale, alpha)


def _lokr_factor(module: str, got: dict, n: int):
    whole, a, b = (got.get(f"lokr_w{n}{s}", (None, None))[1] for s in ("", "_a", "_b"))
    if whole is None and (a is None or b is None):
        raise LoraError(f"incomplete LoKr factors for {module}: need lokr_w{n} or lokr_w{n}_a + lokr_w{n}_b")
    if whole is not None and (a is not None or b is not None):
        raise LoraError(f"LoKr factor {n} of {module} is given both whole and decomposed")
    if whole is None and (a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]):
        raise LoraError(f"LoKr factors lokr_w{n}_a {tuple(a.shape)} and lokr_w{n}_b {tuple(b.shape)} "
                        f"of {module} do not multiply")
    if whole is not None and whole.dim() != 2:
        raise LoraError(f"LoKr factor lokr_w{n} of {module} must be a matrix, got {tuple(whole.shape)}")
    return whole, a, b


def _build_lokr(module: str, got: dict) -> Entry:
    w1, w1a, w1b = _lokr_factor(module, got, 1)
    w2, w2a, w2b = _lokr_factor(module, got, 2)
    alpha = _alpha_value(got["alpha"][1], got["alpha"][0]) if "alpha" in got else None
    # LyCORIS: alpha / dim only when a factor is decomposed (dim = its inner size, w2 first).
    dim = w2b.shape[0] if w2b is not None else (w1b.shape[0] if w1b is not None else None)
    scale = alpha / dim if (alpha and dim) else 1.0
    return LoKr(module, w1, w1a, w1b, w2, w2a, w2b, scale, alpha)


def _build_module(module: str, got: dict, resolved: dict, peft: dict, path: str) -> list[Entry]:
    """Entries for one module from its keys (``got``: role -> (key, tensor))."""
    families = {f for f, tags in (("lora", ("down", "up", "bias")), ("loha", ("hada_",)), ("lokr", ("lokr_",)))
                if any(r.startswith(tags) for r in got)}
    if len(families) > 1:
        raise LoraError(f"{module} is given as several adapter types at once ({', '.join(sorted(families))}): "
                        + ", ".join(k for k, _ in got.values()))
    out: list[Entry] = []
    if families == {"lora"}:
        out += _build_lora(module, got, peft, path)
    elif families == {"loha"}:
        out.append(_build_loha(module, got))
    elif families == {"lokr"}:
        out.append(_build_lokr(module, got))
    elif "alpha" in got and not (set(got) & {"diff", "diff_b", "diff_m"}):
        raise LoraError(f"{got['alpha'][0]}: an alpha with no LoRA matrices for {module}")
    for role in ("diff", "diff_b", "diff_m"):
        if role in got:
            out.append(FullDelta(module, resolved[role], got[role][1]))
    return out


def normalise(lora: LoraFile, space: KeySpace) -> LoraContents:
    """Canonical entries of ``lora`` for a model with key space ``space``; raises on a malformed file."""
    keys, unknown, naming = _parse_keys(lora.tensors, space)
    peft = peft_metadata(lora.metadata, lora.path) if naming == "diffusers" else {}
    contents = LoraContents(format=_format_label(keys, naming), unknown=unknown)
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    resolved: dict[str, dict[str, str]] = {}
    paths: dict[str, str] = {}
    for k in keys:
        res = space.resolve(k.official, _TARGET.get(k.role, "weight"))
        if res.status == "unknown":
            contents.unknown[k.key] = "no such module in a Wan DiT"
            continue
        if res.status != "present":
            (contents.dropped if res.status == "absent" else contents.out_of_range).append(k.key)
            continue
        got = groups.setdefault(res.name, {})
        if k.role in got:
            raise LoraError(f"two keys in {lora.path.name} give the same tensor: {got[k.role][0]} and {k.key}")
        got[k.role] = (k.key, lora.tensors[k.key])
        resolved.setdefault(res.name, {})[k.role] = res.param
        paths[res.name] = k.path
    try:
        for module, got in groups.items():
            contents.entries += _build_module(module, got, resolved[module], peft, paths[module])
    except LoraError as e:
        raise LoraError(f"LoRA {lora.path.name}: {e}") from None
    return contents


def summarize_ranks(entries: list[Entry]) -> Counter:
    """How many entries have each rank (full deltas and undecomposed LoKr are left out)."""
    return Counter(e.rank for e in entries if e.rank is not None)
