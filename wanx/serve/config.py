"""The server's settings (one frozen object built from the command line) and its data folder."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

LOOPBACK_NAMES = ("localhost",)
_ID = re.compile(r"video_[0-9a-f]{24}")
IMAGE_NAME = "input.png"  # an uploaded image, re-encoded: uploads/<id>/input.png


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``wanx serve`` is told; limits are per request unless named otherwise."""

    data: Path
    ckpt_dir: str | None = None  # None: the built-in demo model
    task: str | None = None
    device: str | None = None
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # never printed, never logged
    max_queue: int = 100  # queued + running jobs; one more is a 429
    max_image_bytes: int = 16 << 20
    max_audio_bytes: int = 32 << 20
    max_frames: int = 121
    max_steps: int = 100
    max_area: int = 1280 * 720  # width x height of the output
    max_prompt_chars: int = 4000
    allow_any_size: bool = False  # as the CLI: only the task's official sizes unless set
    max_attempts: int = 3  # runs of one job cut short by a server crash before it fails as interrupted
    lora_dir: Path | None = None
    prompt_extend: str | None = None
    prompt_extend_url: str | None = None
    prompt_extend_model: str | None = None
    prompt_extend_lang: str = "auto"
    threads: int | None = None

    @property
    def max_body_bytes(self) -> int:
        """The largest request body: both uploads plus room for the form fields."""
        return self.max_image_bytes + self.max_audio_bytes + (1 << 20)


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DataDir:
    """The data folder: ``queue.sqlite3``, ``videos/``, ``uploads/<id>/``, ``tmp/``.

    Every path the server touches is built here from a server-made id checked by :meth:`job_path`;
    nothing a request sends (a file name, a path) ever becomes part of a path.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        for sub in ("videos", "uploads", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "queue.sqlite3"
        self._lock_file = None

    def lock(self) -> None:
        """Refuse a second server on the same folder (the lock dies with the process, even on kill -9)."""
        import fcntl  # POSIX only: imported here so `import wanx.serve` (the CLI's flags) works anywhere

        handle = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise RuntimeError(f"another wanx server is using {self.root}") from None
        self._lock_file = handle

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @staticmethod
    def new_id() -> str:
        return "video_" + secrets.token_hex(12)

    @staticmethod
    def valid_id(job_id: str) -> bool:
        return isinstance(job_id, str) and _ID.fullmatch(job_id) is not None

    def job_path(self, job_id: str, kind: str) -> Path:
        """The file of ``kind`` (video, thumbnail, spritesheet, uploads) for a checked id."""
        if not self.valid_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        names = {"video": f"videos/{job_id}.mp4", "thumbnail": f"videos/{job_id}.thumbnail.webp",
                 "spritesheet": f"videos/{job_id}.spritesheet.webp", "uploads": f"uploads/{job_id}"}
        return self.root / names[kind]

    def staging(self) -> Path:
        """A fresh name in ``tmp/`` for an upload being received."""
        return self.root / "tmp" / f"{secrets.token_hex(8)}.upload"

    def remove_job_files(self, job_id: str) -> None:
        for kind in ("video", "thumbnail", "spritesheet"):
            self.job_path(job_id, kind).unlink(missing_ok=True)
        shutil.rmtree(self.job_path(job_id, "uploads"), ignore_errors=True)

    def published_videos(self) -> set[str]:
        """Ids whose mp4 is in ``videos/`` (published atomically, so whole)."""
        return {p.stem for p in (self.root / "videos").glob("video_*.mp4") if self.valid_id(p.stem)}

    def clean(self, known_ids: set[str]) -> int:
        """At start-up: remove what a killed server left half-done (temporaries, uploads of jobs
        that were never committed). Returns how many entries went."""
        removed = 0
        for leftover in [*(self.root / "tmp").iterdir(), *(self.root / "videos").glob(".*.partial*"),
                         *(self.root / "uploads").glob("**/.*.partial*")]:
            _remove(leftover)
            removed += 1
        for folder in (self.root / "uploads").iterdir():
            if folder.name not in known_ids:
                _remove(folder)
                removed += 1
        return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def default_data_dir() -> Path:
    """``$WANX_SERVE_DATA`` or ``./wanx-serve-data``."""
    return Path(os.environ.get("WANX_SERVE_DATA", "wanx-serve-data"))
