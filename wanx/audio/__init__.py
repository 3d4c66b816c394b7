"""Speech input for S2V: decoding with PyAV, wav2vec2 (plain torch), and per-frame audio features."""

from .decode import AudioError, Speech, read_speech
from .features import bucket_features, bucket_indices, clip_count, feature_frames, speech_features
from .wav2vec2 import Wav2Vec2, Wav2Vec2Config

__all__ = ["AudioError", "Speech", "read_speech", "Wav2Vec2", "Wav2Vec2Config", "bucket_features",
           "bucket_indices", "clip_count", "feature_frames", "speech_features"]
