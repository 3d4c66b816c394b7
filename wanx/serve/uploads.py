"""Request bodies and uploaded files: size caps, safe decoding, storage inside the data folder only.

An image is decoded with the same guarded reader as a CLI input (pixel cap, verify, whole decode)
and stored re-encoded as PNG under ``uploads/<job id>/``: what the worker reads later is a plain
file wanx wrote, never the client's bytes or name. Audio is probed with PyAV (an audio stream, a
bounded duration) before a task that takes audio gets it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from pathlib import Path
from typing import Any, BinaryIO

from ..atomic import atomic_output
from ..errors import InputError
from .config import IMAGE_NAME, DataDir
from .errors import ApiError

MAX_AUDIO_SECONDS = 600
_CHUNK = 1 << 16


class BodyTooLarge(ApiError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit >> 20} MiB", code="payload_too_large")


class BodyLimit:
    """ASGI middleware: a body past ``limit`` bytes is refused (413) whether or not it declares its length."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, BodyTooLarge(self.limit).body())
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)  # inside the endpoint: the 413 handler answers
            return message

        return await self.app(scope, limited_receive, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def stage_file(data: DataDir, source: BinaryIO, limit: int, name: str) -> Path:
    """Copy an upload into ``tmp/`` under a server-made name, refusing it past ``limit`` bytes (413)."""
    path = data.staging()
    copied = 0
    try:
        with open(path, "wb") as out:
            while chunk := source.read(_CHUNK):
                copied += len(chunk)
                if copied > limit:
                    raise ApiError(413, f"{name} is larger than {limit >> 20} MiB", param=name)
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if copied == 0:
        path.unlink(missing_ok=True)
        raise ApiError(400, f"{name} is an empty file", param=name)
    return path


def stage_data_url(data: DataDir, value: Any, limit: int, name: str) -> Path:
    """A JSON image: ``"data:image/...;base64,..."`` or ``{"image_url": that}``; URLs are not fetched."""
    url = value.get("image_url") if isinstance(value, dict) else value
    if isinstance(url, dict):  # {"image_url": {"url": ...}} as in chat messages
        url = url.get("url")
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url[:100]:
        raise ApiError(400, f"{name} must be an uploaded file (multipart) or a base64 data: URL; the server "
                            f"does not fetch URLs or file ids", param=name)
    encoded = url.split(",", 1)[1]
    if len(encoded) * 3 // 4 > limit:
        raise ApiError(413, f"{name} is larger than {limit >> 20} MiB", param=name)
    try:
        raw = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name}: the data URL is not valid base64", param=name) from None
    return stage_file(data, io.BytesIO(raw), limit, name)


def store_image(data: DataDir, staged: Path, job_id: str, name: str) -> Path:
    """Decode a staged upload safely and store it as ``uploads/<id>/input.png``; 400 if it is no image."""
    from ..images import read_image

    try:
        checked = read_image(staged, argument=name)
    except InputError as e:
        # The staged name is the server's own; say "the upload" rather than show a tmp path.
        raise ApiError(400, e.template.replace("{arg}", name).replace(str(staged), "the upload"),
                       param=name) from None
    finally:
        staged.unlink(missing_ok=True)
    dest = data.job_path(job_id, "uploads") / IMAGE_NAME
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(dest) as tmp:
        checked.image.save(tmp, format="PNG")
    return dest


def check_audio(staged: Path, name: str, max_seconds: float = MAX_AUDIO_SECONDS) -> float:
    """The duration of an audio upload; 400 if PyAV finds no audio stream or it is too long."""
    import av

    try:
        with av.open(str(staged)) as container:
            if not container.streams.audio:
                raise ApiError(400, f"{name} has no audio stream", param=name)
            stream = container.streams.audio[0]
            seconds = float(stream.duration * stream.time_base) if stream.duration else \
                (container.duration or 0) / 1e6
            next(container.decode(stream))  # the first frame must decode, not just the header parse
    except ApiError:
        raise
    except (av.error.FFmpegError, StopIteration, ValueError, OSError):
        raise ApiError(400, f"{name} is not an audio file wanx can read", param=name) from None
    if seconds > max_seconds:
        raise ApiError(400, f"{name} is {seconds:.0f} s long; the limit is {max_seconds:.0f} s", param=name)
    return seconds


def remove_staged(path: Path | None) -> None:
    if path is not None:
        path.unlink(missing_ok=True)
