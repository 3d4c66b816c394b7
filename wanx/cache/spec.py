"""From what a user wrote (``--cache magcache:0.08``, ``cache="magcache"``) to a checked step cache.

Everything here reads only configs and the optional ratios file, so a bad value is an
:class:`wanx.InputError` before any weight is loaded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..configs import get_task
from ..errors import InputError
from .fbcache import DEFAULT_FB_THRESHOLD, FirstBlockCache
from .magcache import DEFAULT_MAX_SKIPS, DEFAULT_RETENTION, DEFAULT_THRESHOLD, MagCache
from .published import PUBLISHED_RATIOS
from .ratios import RatioTable
from .session import StepCache

KINDS = ("magcache", "fbcache")
SYNTAX = ("magcache[:THRESH][,K=N][,R=RATIO][,ratios=FILE|TABLE] or fbcache[:THRESH] "
          "(e.g. magcache:0.08; magcache,ratios=demo.json)")
# The official retention rule of each task whose DiT has the official sizes.
OFFICIAL_RULES = {"t2v-A14B": "t2v", "i2v-A14B": "i2v", "ti2v-5B": "ti2v"}


@dataclass(frozen=True)
class CacheSpec:
    """A parsed ``--cache`` value; None fields take the defaults."""

    kind: str
    threshold: float | None = None
    max_skips: int | None = None
    retention: float | None = None
    ratios: str | None = None  # a calibration file, or a published table name


def parse_cache_spec(text: str) -> CacheSpec | None:
    """``"magcache"``, ``"magcache:0.08"``, ``"magcache:0.08,K=3,R=0.4,ratios=FILE"``, ``"fbcache:0.1"``;
    ``"none"``/``"off"`` -> None. Raises :class:`InputError` (argument ``cache``) naming the syntax.

    A ratios path may hold ``:`` but not ``,`` (the item separator).
    """
    match = re.fullmatch(r"\s*([A-Za-z]+)\s*(?:[:,](.*))?", text) if isinstance(text, str) else None
    if match is None:
        raise InputError("cache", f"{{arg}} must be {SYNTAX}, got {text!r}")
    kind, rest = match[1].lower(), (match[2] or "").strip()
    if kind in ("none", "off") and not rest:
        return None
    if kind not in KINDS:
        raise InputError("cache", f"{{arg}}: unknown cache {kind!r}; use {SYNTAX}")
    fields: dict[str, Any] = {}
    for i, item in enumerate([p.strip() for p in rest.split(",")] if rest else []):
        key, eq, value = item.partition("=")
        # A bare first item is the threshold: "magcache:0.08".
        key, value = (key.strip().lower(), value.strip()) if eq else ("thresh" if i == 0 else "", item)
        name = {"thresh": "threshold", "threshold": "threshold", "k": "max_skips", "r": "retention",
                "ratios": "ratios"}.get(key)
        if name is None or name in fields or not value or (kind == "fbcache" and name != "threshold"):
            raise InputError("cache", f"{{arg}}: cannot read {item!r} in {text!r}; use {SYNTAX}")
        fields[name] = value if name == "ratios" else _number(name, value, text)
    return CacheSpec(kind=kind, **fields)


def _number(name: str, value: str, text: str) -> float | int:
    try:
        return int(value) if name == "max_skips" else float(value)
    except ValueError:
        label, what = {"max_skips": ("K", "a whole number"), "retention": ("R", "a number")}.get(
            name, ("the threshold", "a number"))
        raise InputError("cache", f"{{arg}}: {label} must be {what}, got {value!r} in {text!r}; "
                                  f"use {SYNTAX}") from None


def resolve_cache(value: Any, facts, *, image: bool = False) -> StepCache | None:
    """A ready step cache for a checkpoint (``facts``: :class:`wanx.request.ModelFacts`), or None.

    ``value``: None, a ``--cache`` string, a :class:`CacheSpec`, or a built cache (returned as is).
    ``image``: whether the request has an input image (TI2V-5B's two tables differ).
    """
    if value is None or isinstance(value, StepCache):
        return value
    spec = parse_cache_spec(value) if isinstance(value, str) else value
    if spec is None:
        return None
    if not isinstance(spec, CacheSpec):
        raise InputError("cache", f"{{arg}} must be a string ({SYNTAX}), a CacheSpec or a cache object, "
                                  f"got {type(value).__name__}")
    if spec.kind == "fbcache":
        return FirstBlockCache(DEFAULT_FB_THRESHOLD if spec.threshold is None else spec.threshold)
    table = _ratio_table(spec.ratios, facts, image)
    return MagCache(table, threshold=DEFAULT_THRESHOLD if spec.threshold is None else spec.threshold,
                    max_skips=DEFAULT_MAX_SKIPS if spec.max_skips is None else spec.max_skips,
                    retention=DEFAULT_RETENTION if spec.retention is None else spec.retention,
                    retention_rule=retention_rule_for(facts))


def _ratio_table(ratios: str | None, facts, image: bool) -> RatioTable:
    if ratios is not None:
        return RatioTable.published(ratios) if ratios in PUBLISHED_RATIOS else RatioTable.load(Path(ratios))
    name = published_table_for(facts, image)
    if name is None:
        raise InputError("cache", f"{{arg}}: no published MagCache ratios fit this {facts.spec.name} checkpoint "
                                  f"(its DiT is not the official size); measure them with `wanx calibrate "
                                  f"magcache --ckpt_dir DIR --out FILE` and pass ratios=FILE "
                                  f"(e.g. magcache,ratios=FILE), or name a table: {', '.join(PUBLISHED_RATIOS)}")
    return RatioTable.published(name)


def is_official_size(facts) -> bool:
    """Whether the checkpoint's DiT and expert count are those of its official task (a fine-tune counts)."""
    try:
        official = get_task(facts.spec.name)
    except ValueError:
        return False
    core = ("model_type", "dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "patch_size")
    same_dit = all(getattr(facts.dit, k) == getattr(official.dit, k) for k in core)
    return same_dit and facts.num_experts == (2 if official.is_moe else 1)


def published_table_for(facts, image: bool) -> str | None:
    """The published table for an official-size checkpoint (TI2V-5B: its image or text mode), else None."""
    if not is_official_size(facts):
        return None
    name = facts.spec.name
    if name == "ti2v-5B":
        name = "ti2v-5B:i2v" if image else "ti2v-5B:t2v"
    return name if name in PUBLISHED_RATIOS else None


def retention_rule_for(facts) -> str:
    """The official rule for an official-size checkpoint; otherwise per expert ("t2v") with two
    experts and over all steps ("ti2v") with one."""
    if is_official_size(facts) and facts.spec.name in OFFICIAL_RULES:
        return OFFICIAL_RULES[facts.spec.name]
    return "t2v" if facts.num_experts > 1 else "ti2v"
