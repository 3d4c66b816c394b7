"""Read speech from any file PyAV (FFmpeg's libraries) can open: wav, mp3, m4a, flac, ogg, or the
audio track of a video. The result is 16 kHz mono float32, what wav2vec2 expects.

This replaces the official ``librosa.load(path, sr=16000)`` and needs no ffmpeg binary. Channels
are averaged (librosa's mono mixdown); the resampling is FFmpeg's swresample instead of librosa's
soxr, so features differ slightly from the official ones on the same file (parity tests feed both
sides the same 16 kHz samples).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SILENCE_PEAK = 1e-4  # below -80 dBFS everywhere: nothing for the model to lip-sync to


class AudioError(ValueError):
    """An audio input cannot be used; the message says what was found."""


@dataclass(frozen=True)
class Speech:
    """Decoded speech: 16 kHz (or ``sample_rate``) mono float32 samples in [-1, 1]."""

    samples: np.ndarray
    sample_rate: int
    name: str  # the file name (no folders), for the recipe

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def _decode(container, sample_rate: int) -> np.ndarray:
    import av

    stream = container.streams.audio[0]
    resampler = None
    chunks: list[np.ndarray] = []
    for frame in container.decode(stream):
        if resampler is None:  # keep the file's channels: they are averaged below, as librosa does
            resampler = av.AudioResampler(format="fltp", layout=frame.layout.name, rate=sample_rate)
        chunks += [f.to_ndarray() for f in resampler.resample(frame)]  # each [channels, n]
    if resampler is not None:
        chunks += [f.to_ndarray() for f in resampler.resample(None)]  # flush the resampler's delay
    if not chunks:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(chunks, axis=1).mean(axis=0).astype(np.float32)


def read_speech(path: str | os.PathLike, sample_rate: int = 16000) -> Speech:
    """Decode the first audio stream of ``path`` to mono float32 at ``sample_rate``.

    :class:`AudioError` for a missing file, a file that is not audio (or is corrupt), one without
    an audio stream, and one with no samples or only silence.
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise AudioError(f"{path.name} has no audio track (found: {kinds})")
            samples = _decode(container, sample_rate)
    except av.error.FFmpegError as e:
        raise AudioError(f"cannot read {path.name} as audio (unsupported or corrupt file: {e})") from None
    if samples.size == 0:
        raise AudioError(f"{path.name} holds no audio samples (empty audio track)")
    peak = float(np.abs(samples).max())
    if not np.isfinite(peak):
        raise AudioError(f"{path.name} decodes to invalid (NaN/inf) samples")
    if peak < SILENCE_PEAK:
        raise AudioError(f"{path.name} is silent (peak level {peak:.1e}): there is no speech to follow")
    return Speech(samples, sample_rate, path.name)
