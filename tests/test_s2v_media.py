"""Muxing speech into the mp4 with PyAV: in sync, cut to the video's length, streamed clip by clip."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from wanx.media import (AudioTrack, Mp4Writer, Video, probe_video, read_audio_track, read_mp4, read_video_frames,
                        write_mp4)

from helpers_s2v import write_audio


def decoded_audio(path):
    with av.open(str(path)) as c:
        stream = c.streams.audio[0]
        samples = np.concatenate([f.to_ndarray() for f in c.decode(stream)], axis=1)
        return samples, stream.rate


def video_seconds(path, fps):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0)) / fps


def clicks(rate: int, seconds: float, at: tuple[float, ...], channels: int = 2) -> np.ndarray:
    x = np.zeros((channels, int(seconds * rate)), np.float32)
    for t in at:
        x[:, int(t * rate):int(t * rate) + rate // 100] = 0.9
    return x


@pytest.mark.parametrize("rate, channels", [(48000, 2), (16000, 1), (44100, 2)])
def test_audio_is_in_sync_and_never_outlasts_the_video(tmp_path, rate, channels):
    frames = np.random.default_rng(0).integers(0, 255, (40, 32, 48, 3), dtype=np.uint8)  # 2.5 s at 16 fps
    track = AudioTrack(clicks(rate, 4.0, (0.5, 2.0), channels), rate)  # longer than the video
    with Mp4Writer(tmp_path / "a.mp4", 16, audio=track) as w:
        for start in range(0, 40, 16):  # three "clips"
            w.write(frames[start:start + 16])
    got, got_rate = decoded_audio(tmp_path / "a.mp4")
    seconds = got.shape[1] / got_rate
    first = np.argmax(np.abs(got[0]) > 0.3) / got_rate
    print(f"{rate} Hz x{channels}: audio {seconds:.4f} s for a 2.5 s video, first click at {first * 1000:.2f} ms")
    assert got_rate == rate and got.shape[0] == channels
    assert 2.5 - 1024 / rate < seconds <= 2.5  # cut to the video, in whole AAC frames
    assert abs(first - 0.5) < 1e-3  # the encoder's priming is trimmed by the edit list: no offset


def test_short_audio_ends_early_and_video_save_muxes(tmp_path):
    video = Video(tensor=torch.zeros(3, 32, 16, 16), fps=16, metadata={"task": "s2v-14B"},
                  audio=AudioTrack(clicks(16000, 0.75, (0.1,), 1), 16000))
    path = video.save(tmp_path / "v.mp4")
    got, rate = decoded_audio(path)
    assert abs(got.shape[1] / rate - 0.75) < 0.07 and video_seconds(path, 16) == 2.0
    assert read_mp4(path)[2] == {"task": "s2v-14B"}


def test_read_audio_track_keeps_rate_and_mixes_down_to_stereo(tmp_path):
    t = np.arange(22050) / 22050
    write_audio(tmp_path / "a.flac", (0.5 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 22050, "flac", 2)
    track = read_audio_track(tmp_path / "a.flac")
    assert track.rate == 22050 and track.samples.shape == (2, 22050) and track.layout == "stereo"


def test_a_failed_write_keeps_a_partial_file_and_never_the_target(tmp_path):
    frames = np.zeros((8, 16, 16, 3), np.uint8)
    (tmp_path / "v.partial.mp4").write_bytes(b"an older partial")
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(tmp_path / "v.mp4", 16) as w:
            w.write(frames)
            raise RuntimeError("boom")
    assert not (tmp_path / "v.mp4").exists()
    assert (tmp_path / "v.partial.mp4").read_bytes() == b"an older partial"  # never overwritten
    assert video_seconds(tmp_path / "v.partial-1.mp4", 16) == 0.5
    with pytest.raises(RuntimeError), Mp4Writer(tmp_path / "w.mp4", 16):
        raise RuntimeError("nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.partial-1.mp4", "v.partial.mp4"]


def test_probe_and_read_pose_frames(tmp_path):
    frames = np.zeros((12, 32, 32, 3), np.uint8)
    for i in range(12):
        frames[i, :, i * 2:i * 2 + 4] = 255
    path = write_mp4(tmp_path / "p.mp4", frames, 30)
    info = probe_video(path)
    assert (info.frames, info.fps, info.width, info.height) == (12, 30.0, 32, 32)
    got = read_video_frames(path, [0, 4, 10])
    assert got.shape == (3, 32, 32, 3)
    assert np.abs(got.astype(int) - frames[[0, 4, 10]]).mean() < 8  # lossy but the same frames
    with pytest.raises(ValueError, match="no frame 20"):
        read_video_frames(path, [2, 20])
    with pytest.raises(ValueError, match="no video stream"):
        write_audio(tmp_path / "a.wav", np.zeros(1600, np.float32) + 0.1, 16000, "pcm_s16le")
        probe_video(tmp_path / "a.wav")
