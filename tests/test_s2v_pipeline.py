"""S2V end to end on a tiny checkpoint: parity with the official ``WanS2V.generate`` loop, clip
chaining, the mp4 with its audio, streaming and partial output, and the resolver's refusals.

The official loop runs from its own module (``wan/speech2video.py``) with its S2V transformer,
UniPC scheduler and audio encoder; the VAE and umT5 are wanx's behind the official interfaces
(their parity is tested in test_vae.py / test_text.py). Both get the same 16 kHz samples.
"""

from __future__ import annotations

import types

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import wanx
from wanx.audio import read_speech
from wanx.configs import S2V_WAV2VEC_DIR
from wanx.errors import Cancelled
from wanx.loading.s2v import read_s2v_config
from wanx.pipelines.s2v import center_crop, describe_s2v_checkpoint, load_s2v_pipeline, short_side_size
from wanx.request import resolve_request, s2v_video_size
from wanx.testing import build_tiny_checkpoint

from helpers_s2v import (OfficialText, OfficialVAE, official_encoder, official_kwargs, official_speech2video, rel_err,
                         speech, write_audio)

PROMPT = "a red circle moving left"
NEGATIVE = "a blue square moving up"
STEPS, SHIFT, GUIDE, SEED = 3, 3.0, 4.5, 1234
FRAMES = 16  # frames per clip in most tests (the official 80 costs 5x the VAE work on a CPU)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These runs are VAE-bound small convolutions: on a shared machine two OpenMP threads were
    measured 15x slower than one (0.7 s vs 11 s per tiny decode), so run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("s2v") / "ckpt", "s2v-14B", seed=7)


def add_tokenizer(folder):
    """The official AudioEncoder loads a whole Wav2Vec2Processor: give the folder a CTC tokenizer."""
    transformers = pytest.importorskip("transformers")
    vocab = folder / "vocab.json"
    if not vocab.is_file():
        vocab.write_text('{"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}')
        transformers.Wav2Vec2CTCTokenizer(str(vocab)).save_pretrained(folder)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 64x64 reference image, 6 s of speech (2 clips), a 30 fps 64x64 pose video of 11 s."""
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "ref.png")
    write_audio(d / "speech.wav", speech(6.0), 16000, "pcm_s16le")
    write_audio(d / "short.wav", speech(0.05), 16000, "pcm_s16le")
    frames = np.zeros((330, 64, 64, 3), np.uint8)
    for i in range(330):  # a bright bar sweeping across, like a rendered skeleton moving
        frames[i, :, (i * 3) % 64:(i * 3) % 64 + 6] = 255
    from wanx.media import write_mp4

    write_mp4(d / "pose.mp4", frames, 30)
    write_mp4(d / "pose_short.mp4", frames[:100], 30)
    return d


@pytest.fixture(scope="module")
def pipe(ckpt):
    return load_s2v_pipeline(ckpt, device="cpu", dtype="float32")


def run_official(pipe, ckpt, media, **kw):
    """``WanS2V.generate`` itself, on an instance holding the official transformer and audio encoder."""
    s2v, mods = official_speech2video()
    add_tokenizer(ckpt / S2V_WAV2VEC_DIR)
    cfg = read_s2v_config(ckpt)
    model = mods.model_s2v.WanModel_S2V(**official_kwargs(cfg)).eval()
    model.load_state_dict(load_file(str(ckpt / "diffusion_pytorch_model.safetensors")), strict=True)
    self = object.__new__(s2v.WanS2V)
    self.__dict__.update(
        device=torch.device("cpu"), param_dtype=torch.float32, vae=OfficialVAE(pipe.vae),
        text_encoder=OfficialText(pipe.text_encoder), noise_model=model, t5_cpu=True, init_on_cpu=False, rank=0,
        audio_encoder=official_encoder(ckpt / S2V_WAV2VEC_DIR, read_speech(media / "speech.wav").samples),
        motion_frames=73, drop_first_motion=True, fps=16, audio_sample_m=0, num_train_timesteps=1000,
        sample_neg_prompt=NEGATIVE)
    with torch.no_grad():
        return s2v.WanS2V.generate(
            self, PROMPT, str(media / "ref.png"), str(media / "speech.wav"), False, None, None, None,
            num_repeat=kw.get("num_clip"), pose_video=kw.get("pose_video"), max_area=64 * 64,
            infer_frames=kw.get("infer_frames", 80),
            shift=SHIFT, sample_solver="unipc", sampling_steps=STEPS, guide_scale=GUIDE, n_prompt=NEGATIVE,
            seed=SEED, offload_model=False, init_first_frame=kw.get("start_from_ref", False))


def run_wanx(pipe, media, **kw):
    kw = {"sample_steps": STEPS, **kw}
    return pipe.generate(PROMPT, NEGATIVE, image=media / "ref.png", audio=media / "speech.wav", size=(64, 64),
                         sample_shift=SHIFT, guide_scale=GUIDE, seed=SEED, **kw)


# ---------------------------------------------------------------------------------------- parity

@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("case", [{"infer_frames": 80}, {"pose": True, "start_from_ref": True}],
                         ids=["two-clips-80", "pose-from-ref"])
def test_two_clips_match_the_official_loop(pipe, ckpt, media, case):
    """Default settings (80-frame clips, the first dropping its motion context), and a pose video
    with the motion context starting from the image (16-frame clips)."""
    frames = case.get("infer_frames", FRAMES)
    kw = {"start_from_ref": case.get("start_from_ref", False), "num_clip": 2, "infer_frames": frames}
    if case.get("pose"):
        kw["pose_video"] = str(media / "pose.mp4")
    expected = run_official(pipe, ckpt, media, **kw)
    video = run_wanx(pipe, media, **kw)
    total = 2 * frames - (0 if kw["start_from_ref"] else 3)  # the first clip drops 3 frames with its motion context
    assert video.tensor.shape == expected.shape == (3, total, 64, 64)
    err = rel_err(video.tensor, expected)
    print(f"\ntwo clips {case}: max rel err vs the official loop {err:.2e}")
    assert expected.std() > 1e-3 and err <= 1e-4


# -------------------------------------------------------------------------------- clips and files

def test_clip_count_follows_the_audio_or_num_clip(pipe, media):
    req = pipe.resolve(PROMPT, image=media / "ref.png", audio=media / "speech.wav", size=(64, 64))
    assert (req.s2v.num_clips, req.frame_num, req.latent_grid) == (2, 157, (20, 8, 8))
    req = pipe.resolve(PROMPT, image=media / "ref.png", audio=media / "speech.wav", size=(64, 64), num_clip=1,
                       infer_frames=48, start_from_ref=True)
    assert (req.s2v.num_clips, req.frame_num, req.latent_grid) == (1, 48, (12, 8, 8))
    assert req.settings()["audio"] == "speech.wav" and req.settings()["num_clip"] == 1


@pytest.mark.filterwarnings("ignore")
def test_streamed_mp4_carries_the_audio_no_longer_than_the_video(pipe, media, tmp_path):
    out = tmp_path / "talk.mp4"
    video = run_wanx(pipe, media, num_clip=2, infer_frames=FRAMES, save_file=out)
    assert video.stats["path"] == str(out) and video.stats["frames"] == 13 + 16
    assert video.tensor.shape[1] == 16  # only the last clip is kept in memory
    with av.open(str(out)) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        v_seconds = sum(1 for _ in c.decode(v)) / 16
    with av.open(str(out)) as c:
        a_samples = sum(f.samples for f in c.decode(audio=0))
        recipe = c.metadata.get("comment", "")
    print(f"video {v_seconds:.3f} s, audio {a_samples / a.rate:.3f} s at {a.rate} Hz")
    assert v_seconds == 29 / 16 and 0 < a_samples / a.rate <= v_seconds
    assert a_samples / a.rate > v_seconds - 0.1  # cut to the video, not much shorter
    assert '"audio": "speech.wav"' in recipe and '"task": "s2v-14B"' in recipe


@pytest.mark.filterwarnings("ignore")
def test_a_failed_run_keeps_the_finished_clips(pipe, media, tmp_path):
    def stop_in_clip_two(step, total, entry):
        if step > STEPS:
            raise Cancelled()

    out = tmp_path / "talk.mp4"
    with pytest.raises(Cancelled):
        run_wanx(pipe, media, infer_frames=FRAMES, save_file=out, callback=stop_in_clip_two)
    assert not out.exists()
    with av.open(str(tmp_path / "talk.partial.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 13  # clip 1 (16 frames less the 3 dropped)


# ----------------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("change, argument, message", [
    ({"audio": None}, "audio", "Text-to-speech"),
    ({"audio": "missing.wav"}, "audio", "does not exist"),
    ({"audio": "short.wav"}, "audio", "shorter than one video frame"),
    ({"audio": "ref.png"}, "audio", "no audio track|cannot read"),
    ({"image": None}, "image", "needs an input image"),
    ({"pose_video": "pose_short.mp4"}, "pose_video", r"has 100 frames at 30.00 fps.*need 160"),
    ({"pose_video": "speech.wav"}, "pose_video", "no video stream"),
    ({"infer_frames": 30}, "infer_frames", "multiple of 4"),
    ({"num_clip": 0}, "num_clip", ">= 1"),
    ({"frame_num": 81}, "frame_num", "infer_frames"),
])
def test_bad_inputs_are_refused_before_loading(ckpt, media, change, argument, message):
    _, facts = describe_s2v_checkpoint(ckpt)
    kw = dict(image=media / "ref.png", audio=media / "speech.wav", size=(64, 64))
    kw.update({k: (media / v if isinstance(v, str) else v) for k, v in change.items()})
    image, size, frame_num = kw.pop("image"), kw.pop("size"), kw.pop("frame_num", None)
    with pytest.raises(wanx.InputError, match=message) as info:
        resolve_request(facts, PROMPT, None, image, size, frame_num, **kw)
    assert info.value.argument == argument


def test_other_tasks_refuse_speech_inputs(tmp_path, media):
    from wanx.pipelines.loader import describe_checkpoint

    _, facts = describe_checkpoint(build_tiny_checkpoint(tmp_path / "t2v", "t2v-A14B"))
    with pytest.raises(wanx.InputError, match="speech-to-video") as info:
        resolve_request(facts, PROMPT, audio=media / "speech.wav")
    assert info.value.argument == "audio"


# ------------------------------------------------------------------------------ sizes and crops

def test_output_size_is_the_official_one():
    s2v, _ = official_speech2video()
    for h, w in [(720, 1280), (1280, 720), (1000, 1000), (480, 833), (64, 64), (300, 200), (4000, 3000),
                 (123, 457), (90, 1600)]:
        for area in (64 * 64, 128 * 128, 832 * 480, 1280 * 720, 1024 * 704):
            assert s2v_video_size(h, w, area) == s2v.WanS2V.get_size_less_than_area(None, h, w, area), (h, w, area)


def test_resize_and_crop_follow_torchvision():
    assert short_side_size(720, 1280, 704) == (704, 1251)  # int(704 * 1280 / 720)
    assert short_side_size(1000, 600, 512) == (853, 512)
    x = torch.arange(5 * 7, dtype=torch.float32).view(1, 5, 7)
    assert torch.equal(center_crop(x, 3, 4), x[:, 1:4, 2:6])  # offsets round((5-3)/2), round((7-4)/2)=2 (1.5 -> 2)
    padded = center_crop(x, 8, 7)  # too small: zero rows split 1 above, 2 below
    assert padded.shape == (1, 8, 7) and padded[:, 0].abs().sum() == 0 and padded[:, -2:].abs().sum() == 0


def test_crop_agrees_with_torchvision_when_installed():
    tv = pytest.importorskip("torchvision.transforms")
    img = torch.rand(3, 37, 53)
    for hw in [(30, 60), (37, 53), (20, 21), (40, 40)]:
        assert torch.equal(center_crop(img, *hw), tv.CenterCrop(hw)(img)), hw


@pytest.mark.filterwarnings("ignore")
def test_image_and_pose_of_other_shapes_are_resized_and_cropped(pipe, media, tmp_path):
    """A 150x90 image in a 128*64 budget gives the official shape; a square pose video is fitted to it."""
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    video = pipe.generate(PROMPT, image=tmp_path / "wide.png", audio=media / "speech.wav", size="128*64",
                          pose_video=media / "pose.mp4", num_clip=1, infer_frames=8, sample_steps=2, seed=3)
    h, w = s2v_video_size(90, 150, 128 * 64)
    assert (h, w) == (64, 128) and video.tensor.shape == (3, 8 - 3, h, w)
    assert torch.isfinite(video.tensor).all() and video.tensor.std() > 1e-3


@pytest.mark.filterwarnings("ignore")
def test_int8_transformer_stays_close(ckpt, media, pipe):
    """--quantize int8 on the S2V transformer (its blocks are the Wan blocks) keeps the video close."""
    q = load_s2v_pipeline(ckpt, device="cpu", dtype="float32", quantize="int8")
    kw = dict(num_clip=1, infer_frames=8, sample_steps=2)
    ref, got = run_wanx(pipe, media, **kw), run_wanx(q, media, **kw)
    err = rel_err(got.tensor, ref.tensor)
    print(f"int8 transformer vs fp32: rel err {err:.2e}")
    assert 0 < err < 0.1


def test_step_caches_are_refused(pipe, media):
    req = pipe.resolve(PROMPT, image=media / "ref.png", audio=media / "speech.wav", size=(64, 64))
    with pytest.raises(wanx.InputError, match="step caches"):
        pipe.run(req, cache=object())


def test_s2v_folders_are_recognised(ckpt, tmp_path):
    from wanx.pipelines.s2v import is_s2v_checkpoint

    assert is_s2v_checkpoint(ckpt) and not is_s2v_checkpoint(tmp_path)
