"""Image and video in/out: the `Video` result, H.264 mp4 writing with the recipe in its metadata."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_output

RECIPE_KEY = "comment"  # mp4 'udta ©cmt' atom: survives remuxing and is shown by ffprobe/players


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """[3,F,H,W] float in [-1,1] -> [F,H,W,3] uint8.

    # parity: the official save_video maps [-1,1] -> [0,1] -> *255 and truncates (no rounding).
    """
    x = video.detach().float().clamp(-1, 1).add(1).div(2).mul(255)
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


@dataclass
class Video:
    """A generated clip: `.tensor` [3,F,H,W] in [-1,1], `.frames` uint8 [F,H,W,3], `.fps`."""

    tensor: torch.Tensor
    fps: int
    metadata: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # timings etc.; not written to the file

    @property
    def frames(self) -> np.ndarray:
        return to_uint8(self.tensor)

    @property
    def num_frames(self) -> int:
        return int(self.tensor.shape[1])

    @property
    def size(self) -> tuple[int, int]:
        """(W, H)."""
        return int(self.tensor.shape[3]), int(self.tensor.shape[2])

    def save(self, path: str | os.PathLike, *, overwrite: bool = False, crf: int = 17) -> Path:
        """Write an H.264 mp4 with the recipe (``metadata``) as JSON in the file's comment tag."""
        return write_mp4(path, self.frames, self.fps, metadata=self.metadata, overwrite=overwrite, crf=crf)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, *, metadata: dict | None = None,
              overwrite: bool = False, crf: int = 17) -> Path:
    """Encode uint8 [F,H,W,3] frames to H.264 (yuv420p) with PyAV, published atomically.

    Without ``overwrite`` an existing ``path`` (even one that appears while encoding) is never
    replaced: :class:`FileExistsError`.
    """
    path = Path(path)
    f, h, w, _ = frames.shape
    # yuv420p needs even sizes; pad by edge replication rather than cropping user content.
    ph, pw = h + (h % 2), w + (w % 2)
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    with atomic_output(path, overwrite=overwrite) as tmp:  # only a complete file ever gets the final name
        _encode_h264(tmp, frames, fps, metadata, crf, (pw, ph))
    return path


def _encode_h264(tmp: Path, frames: np.ndarray, fps: float, metadata: dict | None, crf: int,
                 size: tuple[int, int]) -> None:
    import av

    pw, ph = size
    with av.open(str(tmp), mode="w", format="mp4") as container:
        if metadata:
            container.metadata[RECIPE_KEY] = json.dumps(metadata, ensure_ascii=False, default=str)
        stream = container.add_stream("libx264", rate=Fraction(int(fps), 1) if float(fps).is_integer() else Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "medium"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float, dict]:
    """Decode an mp4 -> (uint8 [F,H,W,3], fps, recipe dict or {})."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = np.stack([fr.to_ndarray(format="rgb24") for fr in container.decode(stream)])
        raw = container.metadata.get(RECIPE_KEY, "")
    try:
        recipe = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        recipe = {"raw": raw}
    return frames, fps, recipe
