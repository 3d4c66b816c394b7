"""A create-video request (multipart or JSON fields) -> the resolver's arguments, checked.

Multipart values all arrive as strings (the official ``openai`` client sends even ``extra_body`` as
form fields), so each field has a kind that turns the text into the value the resolver expects;
JSON values are taken as they are (strings are converted the same way). Peers' names are accepted
as aliases (``num_frames``, ``num_inference_steps``, ``guidance_scale``, ...). An unknown field is
an error: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..configs import parse_size
from .errors import ApiError

# canonical name -> (kind, aliases). Kinds: str, int, float, guide (one float or "low,high"),
# floats (a comma list), bool, seconds, size, loras, file (an upload; handled by the caller).
FIELDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "prompt": ("str", ()), "model": ("str", ()), "seconds": ("seconds", ()), "size": ("size", ()),
    "negative_prompt": ("str", ()), "seed": ("int", ("base_seed",)),
    "frame_num": ("int", ("num_frames",)), "sample_steps": ("int", ("num_inference_steps", "steps")),
    "sample_shift": ("float", ("shift",)), "guide_scale": ("guide", ("guidance_scale", "sample_guide_scale")),
    "boundary": ("float", ()), "sample_solver": ("str", ("solver",)), "recipe": ("str", ()),
    "timesteps": ("floats", ()), "boundary_step": ("int", ()), "cfg_first_steps": ("int", ()),
    "cfg_first_scale": ("guide", ()), "task": ("str", ()), "loras": ("loras", ()),
    "prompt_extend": ("bool", ()), "input_reference": ("file", ("image",)), "audio": ("file", ()),
}
ALIASES = {alias: name for name, (_, aliases) in FIELDS.items() for alias in aliases}
RESOLVER_ARGS = ("prompt", "negative_prompt", "size", "frame_num", "sample_steps", "sample_shift", "guide_scale",
                 "boundary", "sample_solver", "seed", "recipe", "timesteps", "boundary_step", "cfg_first_steps",
                 "cfg_first_scale")


@dataclass
class Submission:
    """A request's fields by canonical name, plus the name the client used for each (for errors)."""

    values: dict[str, Any] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)  # canonical -> as sent

    def name(self, canonical: str) -> str:
        return self.names.get(canonical, canonical)


def collect(fields: list[tuple[str, Any]]) -> Submission:
    """Fields as received (name, value) -> a :class:`Submission`; unknown or repeated names are a 400."""
    sub = Submission()
    for sent, value in fields:
        canonical = ALIASES.get(sent, sent)
        if canonical not in FIELDS:
            known = ", ".join(sorted(FIELDS))
            raise ApiError(400, f"unknown field {sent!r}; known fields: {known}", param=sent, code="unknown_parameter")
        if canonical in sub.values:
            raise ApiError(400, f"{sent!r} is given twice (or with its alias {sub.names[canonical]!r})", param=sent)
        kind = FIELDS[canonical][0]
        sub.values[canonical] = value if kind == "file" else convert(sent, kind, value)
        sub.names[canonical] = sent
    return sub


def convert(name: str, kind: str, value: Any) -> Any:
    """A field's text (or JSON value) -> the typed value; a 400 naming the field if it cannot be."""
    if value is None or not isinstance(value, str) or kind in ("str", "size"):
        if kind == "str" and value is not None and not isinstance(value, str):
            raise ApiError(400, f"{name} must be a string, got {type(value).__name__}", param=name)
        return value
    text = value.strip()
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return _finite(float(text))
        if kind in ("guide", "floats"):
            parts = [_finite(float(p)) for p in text.split(",")]
            return parts[0] if kind == "guide" and len(parts) == 1 else parts
        if kind == "bool":
            return {"true": True, "1": True, "yes": True, "on": True,
                    "false": False, "0": False, "no": False, "off": False}[text.lower()]
        if kind == "seconds":
            return _finite(float(text))
        if kind == "loras":
            return [p.strip() for p in text.split(",") if p.strip()]
    except (ValueError, KeyError):
        pass
    raise ApiError(400, f"{name}: cannot read {value!r} as {_KIND_TEXT[kind]}", param=name)


_KIND_TEXT = {"int": "a whole number", "float": "a number", "guide": "a number or 'low,high'",
              "floats": "comma-separated numbers", "bool": "true or false", "seconds": "a number of seconds",
              "loras": "comma-separated LoRA names"}


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(x)
    return x


def frames_for_seconds(seconds: Any, fps: int, name: str = "seconds") -> int:
    """A duration -> the nearest 4n+1 frame count at ``fps`` (at least 1 frame)."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ApiError(400, f"{name} must be a positive number of seconds, got {seconds!r}", param=name)
    return 4 * max(0, round(seconds * fps / 4)) + 1


def resolver_args(sub: Submission, fps: int) -> dict[str, Any]:
    """The resolver's keyword arguments from a submission (``seconds`` -> ``frame_num``, size 'WxH')."""
    args = {k: sub.values[k] for k in RESOLVER_ARGS if k in sub.values and sub.values[k] is not None}
    if "seconds" in sub.values:
        if "frame_num" in args:
            raise ApiError(400, f"give {sub.name('seconds')} or {sub.name('frame_num')}, not both",
                           param=sub.name("seconds"))
        args["frame_num"] = frames_for_seconds(sub.values["seconds"], fps, sub.name("seconds"))
    if isinstance(args.get("size"), str):
        try:
            w, h = parse_size(args["size"])
        except ValueError:
            raise ApiError(400, f"{sub.name('size')} must be 'WxH', e.g. 1280x720, got {args['size']!r}",
                           param=sub.name("size")) from None
        args["size"] = f"{w}*{h}"
    for key in ("guide_scale", "cfg_first_scale"):
        if isinstance(args.get(key), list):
            args[key] = tuple(args[key])
    return args
