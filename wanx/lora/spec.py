"""The CLI value ``PATH[:STRENGTH][@high|@low]`` -> (path, strength, expert)."""

from __future__ import annotations

import math
import os
import re

from .errors import LoraError

_EXPERT = re.compile(r"@(high|low|both)$", re.IGNORECASE)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_lora_arg(value: str, exists=os.path.isfile) -> tuple[str, float, str]:
    """Split ``--lora`` values such as ``style.safetensors:0.8@high`` or ``C:\\loras\\x.safetensors``.

    A suffix is only taken as a strength (or expert) when what precedes it is a sensible path; if
    the whole value is an existing file while the shortened path is not, the value is the path (a
    file really named ``a:1.5``). Both existing is ambiguous and refused.
    """
    if not value:
        raise LoraError("--lora needs a file: PATH[:STRENGTH][@high|@low]")
    path, strength, expert = value, 1.0, "both"
    m = _EXPERT.search(path)
    if m:
        path, expert = path[: m.start()], m.group(1).lower()
    head, sep, tail = path.rpartition(":")
    number = _number(tail) if sep else None
    # "C:5" would be a drive-relative Windows path, not a path with a strength.
    if number is not None and not re.fullmatch(r"[A-Za-z]", head):
        path, strength = head, number
    if (path, strength, expert) != (value, 1.0, "both") and exists(value):
        if exists(path):
            raise LoraError(f"--lora {value!r} is ambiguous: both {value!r} and {path!r} are files")
        path, strength, expert = value, 1.0, "both"
    if not path:
        raise LoraError(f"--lora {value!r} has no file name before the strength/expert")
    return path, strength, expert
