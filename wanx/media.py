"""Image, video and audio in/out: the `Video` result, H.264 mp4 writing with the recipe in its
metadata and an optional AAC audio track (S2V), clip-by-clip mp4 streaming, and pose-video reading."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
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
    audio: "AudioTrack | None" = None  # muxed as AAC, cut to the video's length (S2V)

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
        return write_mp4(path, self.frames, self.fps, metadata=self.metadata, overwrite=overwrite, crf=crf,
                         audio=self.audio)


def write_mp4(path: str | os.PathLike, frames: np.ndarray, fps: int, *, metadata: dict | None = None,
              overwrite: bool = False, crf: int = 17, audio: "AudioTrack | None" = None) -> Path:
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
        _encode_h264(tmp, frames, fps, metadata, crf, (pw, ph), audio)
    return path


def _encode_h264(tmp: Path, frames: np.ndarray, fps: float, metadata: dict | None, crf: int,
                 size: tuple[int, int], audio: "AudioTrack | None" = None) -> None:
    with _Mp4Stream(tmp, fps, size, metadata, crf, audio) as out:
        out.write(frames)


def _even(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even sizes; pad by edge replication rather than cropping user content."""
    f, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    return frames


class _Mp4Stream:
    """An open mp4 being written: H.264 frames as they come, and the audio (if any) up to the
    length of the video written so far, in whole AAC frames."""

    def __init__(self, path: Path, fps: float, size: tuple[int, int], metadata: dict | None, crf: int,
                 audio: "AudioTrack | None"):
        import av

        self.container = av.open(str(path), mode="w", format="mp4")
        if metadata:
            self.container.metadata[RECIPE_KEY] = json.dumps(metadata, ensure_ascii=False, default=str)
        rate = Fraction(int(fps), 1) if float(fps).is_integer() else Fraction(fps).limit_denominator(1001)
        self.video = self.container.add_stream("libx264", rate=rate)
        self.video.width, self.video.height, self.video.pix_fmt = size[0], size[1], "yuv420p"
        self.video.options = {"crf": str(crf), "preset": "medium"}
        self.fps, self.frames = float(fps), 0
        self.audio, self.fed = audio, 0
        if audio is not None:
            self.aac = self.container.add_stream("aac", rate=audio.rate, layout=audio.layout)
            self.aac.bit_rate = 192_000  # the official merge_video_audio's -b:a 192k

    def write(self, frames: np.ndarray) -> None:
        import av

        for frame in frames:
            packets = self.video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            for packet in packets:
                self.container.mux(packet)
        self.frames += len(frames)
        if self.audio is not None:
            self._feed_audio()

    def _feed_audio(self) -> None:
        """Encode the audio the video now covers, in whole AAC frames, so the track never outlasts the
        frames (the official ``ffmpeg ... -shortest``, without an ffmpeg binary). Frames carry their
        pts, so the muxer writes an edit list for the encoder's priming and players start in sync."""
        import av

        rate = self.audio.rate
        budget = int(self.frames / self.fps * rate) // AAC_FRAME * AAC_FRAME
        stop = min(budget, self.audio.samples.shape[1])
        while self.fed < stop:
            n = min(AAC_FRAME, stop - self.fed)  # shorter only at the end of the audio
            chunk = self.audio.samples[:, self.fed:self.fed + n]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self.audio.layout)
            frame.sample_rate, frame.pts = rate, self.fed
            for packet in self.aac.encode(frame):
                self.container.mux(packet)
            self.fed += n

    def close(self) -> None:
        for packet in self.video.encode():
            self.container.mux(packet)
        if self.audio is not None:
            for packet in self.aac.encode(None):
                self.container.mux(packet)
        self.container.close()

    def __enter__(self) -> "_Mp4Stream":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.container.close()


AAC_FRAME = 1024  # samples per AAC frame
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)


@dataclass(frozen=True)
class AudioTrack:
    """Audio to mux: float32 ``samples [channels, n]`` in [-1, 1] (1 or 2 channels) at ``rate`` Hz."""

    samples: np.ndarray
    rate: int

    @property
    def layout(self) -> str:
        return "mono" if self.samples.shape[0] == 1 else "stereo"

    @property
    def seconds(self) -> float:
        return self.samples.shape[1] / self.rate


def read_audio_track(path: str | os.PathLike) -> AudioTrack:
    """The first audio stream of ``path`` for muxing: its own rate (48 kHz if AAC cannot store it),
    mono or stereo (more channels are mixed down to stereo)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate if stream.rate in AAC_RATES else 48000
        layout = "mono" if stream.channels == 1 else "stereo"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        chunks = [f.to_ndarray() for frame in container.decode(stream) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray() for f in resampler.resample(None)]
    channels = 1 if layout == "mono" else 2
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    return AudioTrack(samples.astype(np.float32), rate)


class Mp4Writer:
    """Write an mp4 clip by clip (each :meth:`write` encodes its frames, and the audio they cover).

    Nothing is held back but the encoders' own buffers. :meth:`close` publishes the file atomically
    under ``path``; if the run fails (an exception inside ``with``) after some frames were written,
    the frames so far are kept as ``<stem>.partial.mp4`` next to it (never over an existing file).
    """

    def __init__(self, path: str | os.PathLike, fps: float, *, metadata: dict | None = None,
                 audio: AudioTrack | None = None, overwrite: bool = False, crf: int = 17):
        self.path, self.fps, self.metadata, self.audio, self.crf = Path(path), fps, metadata, audio, crf
        self._stack = ExitStack()
        self._tmp = self._stack.enter_context(atomic_output(self.path, overwrite=overwrite))
        self._out: _Mp4Stream | None = None
        self.partial: Path | None = None

    @property
    def frames_written(self) -> int:
        return 0 if self._out is None else self._out.frames

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 ``[F, H, W, 3]`` frames (every call the same H and W)."""
        frames = _even(frames)
        if self._out is None:
            size = (frames.shape[2], frames.shape[1])
            self._out = _Mp4Stream(self._tmp, self.fps, size, self.metadata, self.crf, self.audio)
        self._out.write(frames)

    def close(self) -> Path:
        if self._out is None:
            raise RuntimeError(f"no frames were written for {self.path}")
        self._out.close()
        self._stack.close()  # publishes
        return self.path

    def abort(self, exc: BaseException | None = None) -> Path | None:
        """Stop; keep what was written as ``<stem>.partial.mp4`` (returned) if anything was."""
        if self._out is not None and self._out.frames:
            self._out.close()
            self.partial = _free_name(self.path.with_name(self.path.stem + ".partial.mp4"))
            os.replace(self._tmp, self.partial)
        elif self._out is not None:
            self._out.container.close()
        error = exc or RuntimeError("aborted")
        self._stack.__exit__(type(error), error, error.__traceback__)  # drops the temporary
        return self.partial

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort(exc)


def _free_name(path: Path) -> Path:
    n, candidate = 1, path
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    fps: float
    width: int
    height: int


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Frame count, average fps and size of the first video stream (packets are counted when the
    container does not say). Raises ValueError naming what is wrong."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{Path(path).name} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
            return VideoInfo(int(frames), fps, stream.codec_context.width, stream.codec_context.height)
    except av.error.FFmpegError as e:
        raise ValueError(f"cannot read {Path(path).name} as a video ({e})") from None


def read_video_frames(path: str | os.PathLike, indices) -> np.ndarray:
    """uint8 ``[n, H, W, 3]`` RGB frames at the given (increasing) decode-order indices."""
    import av

    wanted = sorted(set(int(i) for i in indices))
    found: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                found[i] = frame.to_ndarray(format="rgb24")
            if i >= wanted[-1]:
                break
    missing = [i for i in wanted if i not in found]
    if missing:
        raise ValueError(f"{Path(path).name} has no frame {missing[0]} (it decodes {len(found)} of those asked)")
    return np.stack([found[int(i)] for i in indices])


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
