"""Prompt extension: rewrite a short prompt into a detailed one before generating, never failing.

A *backend* is anything with ``complete(system, user, image_url, seed) -> str`` that raises on
failure (:class:`~wanx.prompts.openai_chat.ChatBackend`, :class:`~wanx.prompts.local_lm.LocalLMBackend`).
:func:`extend_prompt` picks the system prompt for the task, calls the backend and checks the
reply; on *any* failure it returns the original prompt with ``ok=False`` and a message for the
user, so a dead extension server never stops a generation.
"""

from __future__ import annotations

import base64
import io
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from .system_prompts import LANGS, detect_lang, pick_kind, system_prompt

log = logging.getLogger("wanx")

MAX_REPLY_CHARS = 4000  # far above any useful video prompt; a longer reply is a runaway model
IMAGE_MAX_AREA = 512 * 512  # what a vision-language model needs to see the scene; keeps requests small
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


class ExtendFailed(RuntimeError):
    """A backend could not produce a usable rewrite; the message is safe to show to the user."""


class Backend(Protocol):
    name: str
    model: str
    sees_images: bool

    def complete(self, system: str, user: str, image_url: str | None, seed: int) -> str: ...


@dataclass(frozen=True)
class ExtendResult:
    """The prompt to generate with, and what happened (recorded in the video's recipe)."""

    prompt: str  # the extension when ok, else the original
    original: str
    ok: bool
    backend: str
    model: str | None
    kind: str | None  # system-prompt kind: t2v, i2v, i2v_empty (None: the task has none)
    lang: str
    seed: int
    message: str = ""  # why the original was kept, or a note

    def recipe(self) -> dict[str, Any]:
        """The entry for a video's recipe: original and extended prompt, backend, model, seed."""
        entry = asdict(self)
        extended = entry.pop("prompt")
        entry["extended"] = extended if self.ok else None
        return entry


def clean_reply(text: Any) -> str:
    """The rewritten prompt from a model's reply: reasoning blocks, quotes and line breaks removed."""
    if not isinstance(text, str):
        raise ExtendFailed("the model's reply is not text")
    text = _THINK.sub("", text)
    text = text.split("</think>")[-1]  # an unclosed think block: keep what follows it
    text = " ".join(line.strip() for line in text.splitlines() if line.strip()).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'“”「」":
        text = text[1:-1].strip()
    if not text:
        raise ExtendFailed("the model returned an empty prompt")
    if len(text) > MAX_REPLY_CHARS:
        raise ExtendFailed(f"the model's reply is {len(text)} characters (limit {MAX_REPLY_CHARS})")
    return text


def image_data_url(image: Any, max_area: int = IMAGE_MAX_AREA) -> str:
    """A PNG ``data:`` URL of an image (path, PIL image or [3, H, W] tensor), downsized to ``max_area``."""
    from PIL import Image

    from ..images import read_image

    checked = read_image(image)  # the same safe decoding as a generation input (size caps, verify)
    picture = checked.image
    if not isinstance(picture, Image.Image):  # a [3, H, W] tensor in [-1, 1]
        arr = ((picture.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        picture = Image.fromarray(arr, "RGB")
    w, h = picture.size
    if w * h > max_area:
        scale = (max_area / (w * h)) ** 0.5
        picture = picture.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(prompt: str, kind: str, lang: str) -> str:
    """What the model is asked to rewrite (an image task with no prompt says so explicitly)."""
    if kind == "i2v_empty":
        return "（没有指令）" if lang == "zh" else "(no instruction)"
    return prompt.strip()


def extend_prompt(backend: Backend | None, prompt: str, model_type: str, *, image: Any = None,
                  lang: str | None = None, seed: int = 0) -> ExtendResult:
    """Rewrite ``prompt`` for a ``model_type`` task (t2v, i2v, ti2v ...); never raises for a backend failure."""
    lang = detect_lang(prompt) if lang in (None, "auto") else lang
    if lang not in LANGS:
        raise ValueError(f"prompt extension language must be auto, {' or '.join(LANGS)}; got {lang!r}")
    kind = pick_kind(model_type, prompt, image is not None)
    base = dict(original=prompt, backend=getattr(backend, "name", "none"),
                model=getattr(backend, "model", None), kind=kind, lang=lang, seed=int(seed))
    if backend is None:
        return ExtendResult(prompt=prompt, ok=False, message="no prompt extender is configured", **base)
    if kind is None:
        return ExtendResult(prompt=prompt, ok=False, message=f"prompt extension does not apply to "
                                                             f"{model_type} tasks; the prompt is used as given", **base)
    try:
        url = image_data_url(image) if image is not None and backend.sees_images else None
        reply = backend.complete(system_prompt(kind, lang), user_message(prompt, kind, lang), url, int(seed))
        text = clean_reply(reply)
    except Exception as e:  # noqa: BLE001 - any failure keeps the original prompt; the user is told why
        log.debug("prompt extension failed", exc_info=True)
        reason = str(e) if isinstance(e, ExtendFailed) else f"{type(e).__name__}: {e}"
        return ExtendResult(prompt=prompt, ok=False, message=f"prompt extension failed ({reason}); "
                                                             f"using the original prompt", **base)
    note = "" if image is None or backend.sees_images else "this model cannot see images; extended from the text only"
    return ExtendResult(prompt=text, ok=True, message=note, **base)
