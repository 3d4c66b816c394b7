"""S2V audio: PyAV decoding, wanx's wav2vec2 against transformers, and the official feature functions.

A tiny random ``Wav2Vec2ForCTC`` (transformers) is saved with its processor; wanx loads the same
folder with its own wav2vec2. The official ``AudioEncoder`` runs on that folder too (its librosa
``load`` bypassed: both sides get the same 16 kHz samples).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from wanx.audio import AudioError, bucket_features, bucket_indices, clip_count, read_speech
from wanx.audio.features import feature_frames, hidden_states, speech_features, to_video_rate
from wanx.loading.s2v_wav2vec2 import load_wav2vec2
from wanx.loading.safe import CheckpointError

from helpers_s2v import (official_encoder, official_s2v_modules, rel_err, speech, tiny_wav2vec2_folder,
                         write_audio)

TOL = 1e-5


@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    """(folder, transformers model); needs transformers (the reference), unlike wanx's own loading."""
    return tiny_wav2vec2_folder(tmp_path_factory.mktemp("w2v"))


# --------------------------------------------------------------------------------------- wav2vec2

def test_hidden_states_match_transformers_with_the_final_norm(w2v):
    import transformers

    folder, hf = w2v
    ours = load_wav2vec2(folder)
    x = speech(2.0)
    with torch.no_grad():
        inp = torch.from_numpy((x - x.mean()) / np.sqrt(x.var() + 1e-7))[None]
        out = hf(inp, output_hidden_states=True)
        hf_states = torch.cat(out.hidden_states)  # [L + 1, T, C]
        last = hf.wav2vec2(inp).last_hidden_state[0]
    mine = hidden_states(ours.model, x)
    assert mine.shape == (4, 99, 32)  # 2 s -> 99 frames at 50 Hz; 3 layers -> 4 states
    err_body = rel_err(mine[:-1], hf_states[:-1])
    err_last = rel_err(mine[-1], last)
    # transformers 5 returns the last layer without the encoder's final LayerNorm; 4.x (the official pin) with it.
    trap = not torch.allclose(hf_states[-1], last, atol=1e-6)
    print(f"wav2vec2 states 0..L-1 rel err {err_body:.2e}; state L vs layer-normed last {err_last:.2e}; "
          f"transformers {transformers.__version__} leaves the last state un-normed: {trap}")
    assert err_body <= TOL and err_last <= TOL


def test_both_weight_norm_spellings_load(w2v, tmp_path):
    """transformers saves the positional conv as weight_g/weight_v or as parametrizations.original0/1."""
    from safetensors.torch import load_file, save_file

    folder, _ = w2v
    sd = load_file(str(folder / "model.safetensors"))
    names = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    swapped = {}
    for k, v in sd.items():
        for a, b in names.items():
            if k.endswith(a):
                k = k.replace(a, b)
            elif k.endswith(b):
                k = k.replace(b, a)
        swapped[k] = v
    assert swapped.keys() != sd.keys()
    for f in ("config.json", "preprocessor_config.json", "processor_config.json"):
        if (folder / f).is_file():
            (tmp_path / f).write_text((folder / f).read_text())
    save_file(swapped, str(tmp_path / "model.safetensors"))
    a, b = load_wav2vec2(folder).model, load_wav2vec2(tmp_path).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_wav2vec2_folder_problems_are_named(w2v, tmp_path):
    folder, _ = w2v
    with pytest.raises(CheckpointError, match="not found"):
        load_wav2vec2(tmp_path / "nope")
    cfg = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, feat_extract_norm="group", do_stable_layer_norm=False)))
    with pytest.raises(CheckpointError, match="unsupported wav2vec2"):
        load_wav2vec2(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no wav2vec2 weights"):
        load_wav2vec2(tmp_path)


# ------------------------------------------------------------------------------ official features

@pytest.mark.parametrize("seconds", [0.5, 3.3, 5.2])
def test_features_match_the_official_audio_encoder(w2v, seconds):
    folder, _ = w2v
    x = speech(seconds, seed=1)
    enc = official_encoder(folder, x)
    with torch.no_grad():
        z = enc.extract_audio_feat("unused.wav", return_all_layers=True)  # [L + 1, T30, C]
        bucket, clips_ref = enc.get_audio_embed_bucket_fps(z, fps=16, batch_frames=80, m=0)
    expected = bucket.permute(1, 2, 0)  # as WanS2V.encode_audio: [L + 1, C, clips * 80]
    ours, clips = speech_features(load_wav2vec2(folder).model, x, fps=16, clip_frames=80)
    err = rel_err(ours, expected)
    print(f"{seconds} s of audio: {z.shape[1]} features at 30 fps, {clips} clip(s); rel err {err:.2e}")
    assert clips == clips_ref and ours.shape == expected.shape
    assert z.shape[1] == feature_frames(len(x))  # the resolver's clip count needs no model
    assert err <= TOL


@pytest.mark.parametrize("fps, clip_frames", [(16, 80), (16, 48), (25, 80)])
def test_bucket_indices_match_the_official_at_every_length(fps, clip_frames):
    """Lengths around the clip boundaries (149/150/151 features at 80 frames per clip) and many others."""
    mods = official_s2v_modules()
    enc = object.__new__(mods.audio_encoder.AudioEncoder)
    enc.video_rate = 30
    for n in [1, 2, 149, 150, 151, 299, 300, 301, *range(3, 460, 7)]:
        feats = torch.arange(1, n + 1, dtype=torch.float32)[None, :, None].expand(2, n, 3)  # feature i holds i+1
        bucket, clips_ref = enc.get_audio_embed_bucket_fps(feats, fps=fps, batch_frames=clip_frames, m=0)
        ours, clips = bucket_features(feats, fps, clip_frames)
        assert clips == clips_ref and torch.equal(ours, bucket.permute(1, 2, 0)), n
    assert [clip_count(n, 16, 80) for n in (149, 150, 151)] == [1, 2, 2]
    idx, _ = bucket_indices(150, 16, 80)
    assert idx[:6].tolist() == [0, 2, 4, 6, 8, 9] and idx[4] == 8  # round(7.5) = 8, round(22.5) = 22
    assert idx[12] == 22


def test_video_rate_resampling_length():
    states = torch.randn(3, 99, 4)
    out = to_video_rate(states)
    assert out.shape == (3, 59, 4)  # int(99 / 50 * 30)
    assert torch.equal(out[:, 0], states[:, 0]) and torch.equal(out[:, -1], states[:, -1])  # align_corners
    with pytest.raises(ValueError, match="too short"):
        to_video_rate(states[:, :1])


# ---------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("name, codec, rate, channels", [
    ("a.wav", "pcm_s16le", 44100, 2), ("a.flac", "flac", 48000, 1), ("a.m4a", "aac", 22050, 2),
    ("a.mp3", "libmp3lame", 44100, 1)])
def test_common_formats_decode_to_16k_mono(tmp_path, name, codec, rate, channels):
    import av

    if codec not in av.codecs_available:
        pytest.skip(f"this PyAV build has no {codec} encoder")
    t = np.arange(int(1.5 * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    got = read_speech(write_audio(tmp_path / name, tone, rate, codec, channels))
    assert got.sample_rate == 16000 and got.samples.dtype == np.float32 and got.samples.ndim == 1
    assert abs(got.seconds - 1.5) < 0.08  # lossy codecs add a little priming/padding
    spectrum = np.abs(np.fft.rfft(got.samples[2000:18000]))
    peak_hz = np.argmax(spectrum)  # 16000 samples at 16 kHz: 1 Hz per bin
    assert abs(peak_hz - 440) <= 2 and 0.4 < np.abs(got.samples).max() < 0.6


def test_the_audio_track_of_a_video_is_read(tmp_path):
    from wanx.media import write_mp4

    frames = np.zeros((8, 32, 32, 3), dtype=np.uint8)
    video = write_mp4(tmp_path / "v.mp4", frames, 16)
    with pytest.raises(AudioError, match="no audio track.*video"):
        read_speech(video)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("text", "cannot read"), ("silent", "silent"), ("empty", "no audio samples")])
def test_unusable_audio_is_refused_with_what_was_found(tmp_path, case, message):
    path = tmp_path / "in.wav"
    if case == "text":
        path.write_text("hello, not audio")
    elif case == "silent":
        write_audio(path, np.zeros(16000, dtype=np.float32), 16000, "pcm_s16le")
    elif case == "empty":
        import wave

        with wave.open(str(path), "wb") as w:  # a valid header and no samples
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    with pytest.raises(AudioError, match=message):
        read_speech(path)
