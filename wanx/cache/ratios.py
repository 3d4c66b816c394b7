"""MagCache ratio tables: the published ones, calibration files, and fitting either to a plan.

A table holds, per branch (0 = conditional, 1 = unconditional), one magnitude ratio per step,
``ratio[s] = mean over tokens of |r_s| / |r_{s-1}|`` with ``r`` the block stack's residual; step 0
has no previous residual, so its ratio is 1 by definition. Tables are measured at one step count
and used at any other by nearest-neighbour resampling, one expert's segment at a time. A
segment's first ratio is a transition rather than a point on its curve (step 0's placeholder, or
the drop where the other expert takes over: 0.655 in the T2V table), so it is kept on the
segment's first step and only the rest is resampled: the drop neither moves, nor gets lost
between samples, nor is repeated onto the next step when stretching.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError
from .published import PUBLISHED_RATIOS

FILE_FORMAT = "wanx-magcache-ratios"
FILE_VERSION = 1


def nearest_resample(values: Sequence[float], length: int) -> list[float]:
    """``values`` stretched to ``length`` entries: entry i is ``values[round(i (L-1) / (length-1))]``.

    Both ends map to both ends; a single requested entry is the first value. Halves round up.
    """
    if length <= 0:
        return []
    if len(values) == 0:
        raise ValueError("cannot resample an empty ratio list")
    if length == 1 or len(values) == 1:
        return [float(values[0])] * length
    scale = (len(values) - 1) / (length - 1)
    return [float(values[math.floor(i * scale + 0.5)]) for i in range(length)]


def _segment(values: Sequence[float], length: int) -> list[float]:
    """One expert's ratios at ``length`` steps: the first (a transition) kept, the rest resampled."""
    if length <= 0:
        return []
    return [float(values[0])] + nearest_resample(values[1:] or values[:1], length - 1)


@dataclass(frozen=True)
class RatioTable:
    """Per-branch step ratios as measured, and where the expert switch was when they were."""

    cond: tuple[float, ...]  # one per step, cond[0] == 1.0
    uncond: tuple[float, ...] | None  # None: measured without guidance; the cond ratios stand in
    switch_step: int | None  # first low-noise step of the measured schedule; None: one expert
    source: str  # "published:<name>" or the calibration file's name (never a full path)
    settings: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def steps(self) -> int:
        return len(self.cond)

    @classmethod
    def published(cls, name: str) -> "RatioTable":
        """One of :data:`PUBLISHED_RATIOS` (interleaved cond/uncond for steps 1..N-1)."""
        steps, shift, switch, values = PUBLISHED_RATIOS[name]
        return cls(cond=(1.0, *values[0::2]), uncond=(1.0, *values[1::2]), switch_step=switch,
                   source=f"published:{name}", settings={"steps": steps, "shift": shift, "solver": "unipc"})

    def for_plan(self, num_steps: int, switch_step: int | None) -> list[list[float]]:
        """``[cond, uncond]`` ratios for a plan of ``num_steps`` whose low-noise expert starts at
        ``switch_step`` (``num_steps``: the high-noise expert throughout; None: a one-expert model,
        the table resampled whole)."""
        return [self._fit(series, num_steps, switch_step) for series in (self.cond, self.uncond or self.cond)]

    def _fit(self, series: Sequence[float], num_steps: int, switch_step: int | None) -> list[float]:
        if self.switch_step is None or switch_step is None or not 0 < self.switch_step < len(series):
            return _segment(series, num_steps)
        high, low = series[:self.switch_step], series[self.switch_step:]
        return _segment(high, switch_step) + _segment(low, num_steps - switch_step)

    def to_json(self) -> dict[str, Any]:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "settings": self.settings,
                "switch_step": self.switch_step,
                "ratios": {"cond": list(self.cond), "uncond": None if self.uncond is None else list(self.uncond)}}

    @classmethod
    def load(cls, path: str | Path) -> "RatioTable":
        """A calibration file written by :func:`wanx.cache.calibrate_magcache`; bad files are an InputError."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError("cache", f"{{arg}}: ratios file {path} not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError("cache", f"{{arg}}: cannot read ratios file {path}: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
            raise InputError("cache", f"{{arg}}: {path} is not a MagCache ratios file (format {FILE_FORMAT!r}); "
                                      f"write one with `wanx calibrate magcache`")
        cond, uncond = _series(doc, "cond", path), _series(doc, "uncond", path)
        switch = doc.get("switch_step")
        if switch is not None and (not isinstance(switch, int) or not 0 <= switch <= len(cond)):
            raise InputError("cache", f"{{arg}}: {path}: switch_step must be a step index, got {switch!r}")
        if uncond is not None:
            if len(uncond) != len(cond):
                raise InputError("cache", f"{{arg}}: {path}: cond and uncond ratios differ in length")
            # A step the unconditional pass skipped (guidance 1 there) borrows the conditional ratio.
            uncond = tuple(c if u is None else u for u, c in zip(uncond, cond))
        return cls(cond=cond, uncond=uncond, switch_step=switch, source=path.name,
                   settings=dict(doc.get("settings") or {}))


def _series(doc: dict, branch: str, path: Path) -> tuple | None:
    """One branch's list from a ratios file, checked: positive finite numbers (or null) per step."""
    values = (doc.get("ratios") or {}).get(branch)
    if values is None and branch == "uncond":
        return None
    ok = isinstance(values, list) and len(values) >= 1 and all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)
        for v in values)
    if not ok or (branch == "cond" and None in values):
        raise InputError("cache", f"{{arg}}: {path}: ratios.{branch} must be a list of positive numbers, "
                                  f"one per step")
    return tuple(None if v is None else float(v) for v in values)
