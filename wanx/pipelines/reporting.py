"""What a generation reports: stage times, progress bars, and the recipe stored in the video."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from ..version import __version__

log = logging.getLogger("wanx")


def warn_unknown_words(tokenizer, texts, skip: str = "") -> None:
    """Warn about words the text encoder's vocabulary lacks (they silently become <unk>)."""
    for text in dict.fromkeys(t for t in texts if t != skip):
        unknown = tokenizer.unknown_words(text)
        if unknown:
            log.warning("the text encoder does not know %s; they are read as <unk>", ", ".join(unknown))


@dataclass
class StageTimer:
    """Wall time per stage: ``with timer("denoise"): ...``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class _Bar:
    """A tqdm bar when enabled, else nothing; usable as a step callback."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="step", leave=False)

    def tick(self, value: Any = None) -> Any:
        if self._bar is not None:
            self._bar.update(1)
        return value

    def chain(self, callback: Callable | None) -> Callable:
        """A step callback that advances the bar, then calls ``callback`` (which may cancel)."""
        def on_step(step: int, total: int, entry) -> None:
            self.tick()
            if callback is not None:
                callback(step, total, entry)
        return on_step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "_Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(enabled: bool, total: int, desc: str) -> _Bar:
    return _Bar(enabled, total, desc)


def recipe_for(pipe, req, cache=None) -> dict[str, Any]:
    """Every setting that decides the frames, and what produced them (never a local path)."""
    from ..model.attention import effective_backend

    experts = pipe.experts
    return {"task": pipe.spec.name, **req.settings(), "dtype": str(experts[0].dtype).replace("torch.", ""),
            "text_dtype": str(next(pipe.text_encoder.model.parameters()).dtype).replace("torch.", ""),
            "device": pipe.device.type,
            "attention": effective_backend(pipe.device, pipe.dit_config.head_dim),
            "checkpoint": pipe.checkpoint, "options": asdict(pipe.options),
            "residency": pipe.residency.describe(), "loras": [lora.to_dict() for lora in pipe.loras],
            "cache": None if cache is None else cache.describe(),
            "wanx_version": __version__}
