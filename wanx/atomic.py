"""Atomic file and folder outputs: a result appears whole under its final name, or not at all.

Everything wanx writes (videos, converted checkpoints, training exports) is first written to a
unique temporary name in the destination's own folder (so the final rename never crosses a file
system), then published in one step:

- without ``overwrite`` publishing is exclusive: a hard link (files) or a rename onto a name that
  must not exist (folders) fails if the destination appeared meanwhile, so of several processes
  writing the same path exactly one succeeds and the others get :class:`FileExistsError`;
- with ``overwrite`` the old file is replaced by ``os.replace`` (readers see old or new, never half).

The temporary is removed on any failure, ``KeyboardInterrupt`` included.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_output", "atomic_output_dir", "check_output_path", "temp_name"]


def temp_name(path: Path) -> Path:
    """A unique hidden sibling of ``path`` that keeps its suffix (tools that sniff extensions still work)."""
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.partial{path.suffix}")


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> Path:
    """Refuse an output path that cannot be written, before any work is done; returns it as a Path.

    Checks: not an existing folder, no existing file unless ``overwrite``, the parent is (or can
    become) a folder, and a probe file can be created there.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {path} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise NotADirectoryError(f"{what} {path}: {parent} is a file, not a folder")
    if parent == path.parent:
        _probe(parent, what, path)
    elif not os.access(parent, os.W_OK):
        raise PermissionError(f"{what} {path}: cannot create folders in {parent}")
    return path


def _existing_ancestor(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _probe(folder: Path, what: str, path: Path) -> None:
    probe = temp_name(path)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot write in {folder} ({e.strerror})") from None
    os.close(fd)
    probe.unlink()


@contextmanager
def atomic_output(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; on a clean exit publish it as ``path``.

    The body writes the temporary (by name); if it raises, nothing is published and the
    temporary is deleted. Publishing without ``overwrite`` raises :class:`FileExistsError` when
    ``path`` exists, even if it appeared while the body ran.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    if path.exists() and not overwrite:  # cheap early refusal; the publish below is the real guard
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        if not tmp.is_file():
            raise RuntimeError(f"nothing was written for {path}")
        _publish_file(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _publish_file(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic, and fails if path exists: no check-then-act window
    except FileExistsError:
        raise FileExistsError(f"{path} already exists (it appeared while writing); "
                              f"pass --overwrite (overwrite=True) to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # File systems without hard links: reserve the name exclusively, then replace the placeholder.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            raise FileExistsError(f"{path} already exists (it appeared while writing); "
                                  f"pass --overwrite (overwrite=True) to replace it") from None
        os.replace(tmp, path)


@contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on a clean exit it becomes ``path`` in one rename.

    Without ``overwrite`` an existing ``path`` (file or folder, even an empty one) is refused. With
    it, the old folder is moved aside, the new one renamed in, and only then the old one deleted.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    if path.is_file():
        raise NotADirectoryError(f"{path} is a file; a folder is written there")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    tmp.mkdir()
    try:
        yield tmp
        _publish_dir(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _publish_dir(tmp: Path, path: Path, overwrite: bool) -> None:
    old = None
    if overwrite and path.exists():
        old = temp_name(path)
        os.rename(path, old)
    elif path.exists():
        raise FileExistsError(f"{path} already exists (it appeared while writing); "
                              f"pass --overwrite (overwrite=True) to replace it")
    try:
        # Linux rename() replaces an *empty* folder silently; the mkdir below makes the refusal exact.
        os.mkdir(path)
    except FileExistsError:
        if old is not None:
            os.rename(old, path)
        raise FileExistsError(f"{path} already exists (it appeared while writing); "
                              f"pass --overwrite (overwrite=True) to replace it") from None
    os.rename(tmp, path)  # onto the empty folder we just created: atomic replace
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
