"""From 16 kHz speech to the S2V model's audio input: one 25-layer wav2vec2 feature per video frame.

Exactly the official ``AudioEncoder`` arithmetic (``wan/modules/s2v/audio_encoder.py``):
utterance normalisation, wav2vec2 at 50 frames/s, linear resampling to 30 frames/s, then one
feature per video frame (index ``round(i * 30 / fps)``, half to even), zeros past the end, and as
many clips as the audio needs.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import S2V_AUDIO_FPS
from .wav2vec2 import Wav2Vec2, conv_frames

WAV2VEC_FPS = 50  # wav2vec2 frames per second at 16 kHz (a 320-sample hop)


def normalize_utterance(samples: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole utterance (transformers' Wav2Vec2FeatureExtractor).

    # parity: the same float32 numpy expression, so the rounding is the processor's.
    """
    x = np.asarray(samples, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


@torch.no_grad()
def hidden_states(model: Wav2Vec2, samples: np.ndarray, normalize: bool = True) -> torch.Tensor:
    """``[N]`` 16 kHz samples -> float32 ``[L + 1, T, C]`` on the CPU (the official runs it there, in fp32)."""
    x = normalize_utterance(samples) if normalize else np.asarray(samples, dtype=np.float32)
    device = next(model.parameters()).device
    states = model(torch.from_numpy(np.ascontiguousarray(x))[None].to(device))  # [L + 1, 1, T, C]
    return states[:, 0].float().cpu()


def to_video_rate(states: torch.Tensor, in_fps: int = WAV2VEC_FPS, out_fps: int = S2V_AUDIO_FPS) -> torch.Tensor:
    """``[L, T, C]`` at ``in_fps`` -> ``[L, int(T / in_fps * out_fps), C]`` by linear interpolation
    (``align_corners=True``; the layers are the batch)."""
    # parity: the official length arithmetic, float division then truncation.
    length = int(states.shape[1] / float(in_fps) * out_fps)
    if length < 1:
        raise ValueError(f"{states.shape[1]} wav2vec2 frames are too short for one {out_fps} fps feature")
    out = F.interpolate(states.transpose(1, 2), size=length, mode="linear", align_corners=True)
    return out.transpose(1, 2)  # [L, T', C]


def feature_frames(num_samples: int, sample_rate: int = 16000, kernels=None, strides=None) -> int:
    """How many 30 fps features ``num_samples`` of audio give (the conv stack's length, then the resampling)."""
    if sample_rate != 16000:
        raise ValueError("wav2vec2 features are defined for 16 kHz audio")
    kw = {} if kernels is None else {"kernels": kernels, "strides": strides}
    return int(conv_frames(num_samples, **kw) / float(WAV2VEC_FPS) * S2V_AUDIO_FPS)


def clip_count(num_features: int, fps: int, clip_frames: int, video_rate: int = S2V_AUDIO_FPS) -> int:
    """Clips of ``clip_frames`` video frames that cover ``num_features`` features (official ``min_batch_num``).

    Always one more than the whole clips the audio fills: a 150-feature (5 s) audio gives 2 clips,
    the second all past the end (zero audio), as the official computes it.
    """
    return int(num_features / (clip_frames * (video_rate / fps))) + 1


def bucket_indices(num_features: int, fps: int, clip_frames: int,
                   video_rate: int = S2V_AUDIO_FPS) -> tuple[np.ndarray, int]:
    """The feature index of every video frame of every clip (>= ``num_features``: past the end), and the clip count.

    # parity: official ``get_sample_indices`` with ``fixed_start=0``: ``round(linspace(0, d, n,
    # endpoint=False) * rate)`` with numpy's half-to-even rounding, clipped to the padded length.
    """
    clips = clip_count(num_features, fps, clip_frames, video_rate)
    count = clips * clip_frames
    padded = math.ceil(clips * clip_frames / fps * video_rate)
    duration = count / fps
    times = np.linspace(0, duration, count, endpoint=False)
    idx = np.clip(np.round(times * video_rate).astype(int), 0, padded - 1)
    return idx, clips


def bucket_features(features: torch.Tensor, fps: int, clip_frames: int,
                    video_rate: int = S2V_AUDIO_FPS) -> tuple[torch.Tensor, int]:
    """``[L, T30, C]`` -> ``[L, C, clips * clip_frames]`` (one feature per video frame, zeros past the end), clips.

    The official takes a window of ``2m + 1`` features per frame; it runs with m = 0 (one feature).
    """
    n = features.shape[1]
    idx, clips = bucket_indices(n, fps, clip_frames, video_rate)
    valid = torch.from_numpy(idx < n)
    picked = features[:, torch.from_numpy(np.minimum(idx, n - 1))]  # [L, F, C]
    picked = torch.where(valid[None, :, None], picked, torch.zeros((), dtype=picked.dtype))
    return picked.permute(0, 2, 1).contiguous(), clips  # [L, C, F]


def speech_features(model: Wav2Vec2, samples: np.ndarray, fps: int, clip_frames: int,
                    normalize: bool = True) -> tuple[torch.Tensor, int]:
    """16 kHz mono samples -> the model's ``audio_input`` for every clip ``[L + 1, C, clips * clip_frames]``, clips."""
    feats = to_video_rate(hidden_states(model, samples, normalize))
    return bucket_features(feats, fps, clip_frames)
