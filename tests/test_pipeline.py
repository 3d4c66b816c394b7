"""Pipelines on tiny official-layout folders: loading, defaults, the expert switch, conditioning, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import wanx
from wanx.configs import get_task
from wanx.loading.safe import CheckpointError
from wanx.pipelines.i2v import first_frame_mask, i2v_latent_size
from wanx.pipelines.ti2v import best_output_size, per_token_timesteps
from wanx.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("t2v") / "ckpt", "t2v-A14B", seed=3)


@pytest.fixture(scope="module")
def t2v_pipe(t2v_dir):
    return wanx.load_pipeline(t2v_dir, device="cpu")


def _gen(pipe, **kw):
    args = dict(size=(64, 64), frame_num=5, sample_steps=4, seed=11)
    args.update(kw)
    return pipe.generate("a red circle moving left", **args)


def test_t2v_generates_video_of_requested_shape(t2v_pipe):
    video = _gen(t2v_pipe, size=(128, 64), frame_num=9)
    assert video.tensor.shape == (3, 9, 64, 128)
    assert video.frames.shape == (9, 64, 128, 3) and video.frames.dtype == np.uint8
    assert video.tensor.min() >= -1 and video.tensor.max() <= 1
    assert video.fps == get_task("t2v-A14B").sample_fps
    assert video.metadata["seed"] == 11 and video.metadata["task"] == "t2v-A14B"


def test_same_seed_same_video_and_different_seed_differs(t2v_pipe):
    a, b, c = _gen(t2v_pipe), _gen(t2v_pipe), _gen(t2v_pipe, seed=12)
    assert torch.equal(a.tensor, b.tensor)
    assert not torch.equal(a.tensor, c.tensor)


def test_noise_is_the_official_draw(t2v_pipe):
    req = t2v_pipe.resolve("x", size=(64, 64), frame_num=5, seed=5)
    noise = t2v_pipe.initial_noise(req, (2, 8, 8))
    gen = torch.Generator(device="cpu").manual_seed(5)
    assert torch.equal(noise[0], torch.randn(16, 2, 8, 8, generator=gen, dtype=torch.float32))


def test_batched_cfg_equals_two_passes(t2v_dir):
    batched = _gen(wanx.load_pipeline(t2v_dir, batch_cfg=True)).tensor
    separate = _gen(wanx.load_pipeline(t2v_dir, batch_cfg=False)).tensor
    err = (batched - separate).abs().max().item()
    print(f"batched vs separate CFG: max abs diff {err:.2e}")
    assert err <= 1e-5


def test_expert_switch_and_guidance_follow_the_boundary(t2v_pipe, monkeypatch):
    calls = []
    high, low = t2v_pipe.experts

    def spy(name, model):
        forward = model.forward

        def wrapped(x, t, context, **kw):
            calls.append((name, float(t.flatten()[0]), x.shape[0]))
            return forward(x, t, context, **kw)
        return wrapped

    monkeypatch.setattr(high, "forward", spy("high", high))
    monkeypatch.setattr(low, "forward", spy("low", low))
    _gen(t2v_pipe, sample_steps=8, sample_shift=2.0, boundary=0.875)
    assert len(calls) == 8 and all(b == 2 for _, _, b in calls)  # one batched CFG forward per step
    for name, t, _ in calls:
        assert name == ("high" if t >= 875 else "low")
    assert {n for n, _, _ in calls} == {"high", "low"}


def test_guide_scale_one_skips_the_unconditional_pass(t2v_pipe, monkeypatch):
    batches = []
    for m in t2v_pipe.experts:
        forward = m.forward
        monkeypatch.setattr(m, "forward", lambda x, t, c, f=forward, **kw: batches.append(x.shape[0]) or f(x, t, c, **kw))
    _gen(t2v_pipe, guide_scale=1.0)
    assert batches == [1] * 4


@pytest.mark.parametrize("bad,match", [
    (dict(frame_num=6), "4n\\+1"),
    (dict(size=(72, 64)), "divisible by 16"),
    (dict(sample_solver="ddim"), "unknown sample_solver"),
    (dict(boundary=1.5), "boundary"),
])
def test_bad_input_fails_before_any_work(t2v_pipe, monkeypatch, bad, match):
    monkeypatch.setattr(t2v_pipe, "encode_prompts", lambda *a: pytest.fail("encoded text before checking"))
    with pytest.raises(ValueError, match=match):
        _gen(t2v_pipe, **bad)


def test_t2v_refuses_an_image(t2v_pipe):
    with pytest.raises(ValueError, match="takes no image"):
        _gen(t2v_pipe, image=Image.new("RGB", (64, 64)))


def test_default_negative_prompt_is_the_official_one(t2v_pipe):
    req = t2v_pipe.resolve("x")
    assert req.negative_prompt == get_task("t2v-A14B").negative_prompt
    assert req.negative_prompt.startswith("色调艳丽")


def test_missing_component_is_named(t2v_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(t2v_dir, broken)
    (broken / "Wan2.1_VAE.pth").unlink()
    (broken / "low_noise_model" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        wanx.load_pipeline(broken)
    assert "Wan2.1_VAE.pth" in str(e.value) and "low_noise_model" in str(e.value)


def test_sharded_experts_load(tmp_path):
    folder = build_tiny_checkpoint(tmp_path / "sharded", "t2v-A14B", seed=3, max_shard_bytes=200_000)
    assert (folder / "high_noise_model" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    pipe = wanx.load_pipeline(folder)
    assert _gen(pipe).tensor.shape == (3, 5, 64, 64)


# ------------------------------------------------------------------------------- i2v-A14B


@pytest.fixture(scope="module")
def i2v_pipe(tmp_path_factory):
    return wanx.load_pipeline(build_tiny_checkpoint(tmp_path_factory.mktemp("i2v") / "ckpt", "i2v-A14B"))


def test_i2v_needs_an_image(i2v_pipe):
    with pytest.raises(ValueError, match="needs an input image"):
        _gen(i2v_pipe)


def test_i2v_keeps_image_aspect_within_area(i2v_pipe):
    img = Image.new("RGB", (96, 48), (200, 10, 10))
    video = _gen(i2v_pipe, image=img, size=(64, 64))
    _, f, h, w = video.tensor.shape
    assert f == 5 and w > h and w * h <= 64 * 64 and h % 16 == 0 and w % 16 == 0


def test_i2v_latent_size_matches_official_formula():
    # 832*480 area, 16:9 image: sqrt(399360*0.5625)=473.96 -> //8=59 -> //2*2=58; width 842.6 -> 104.
    # So the official pipeline renders 464x832, not 480x832, for a 1280x720 input.
    assert i2v_latent_size(720, 1280, 832 * 480, 8, 2) == (58, 104)


def test_first_frame_mask_layout():
    m = first_frame_mask(9, 2, 2)
    assert m.shape == (4, 3, 2, 2)
    assert m[:, 0].eq(1).all() and m[:, 1:].eq(0).all()


# ------------------------------------------------------------------------------- ti2v-5B


@pytest.fixture(scope="module")
def ti2v_pipe(tmp_path_factory):
    return wanx.load_pipeline(build_tiny_checkpoint(tmp_path_factory.mktemp("ti2v") / "ckpt", "ti2v-5B"))


def test_ti2v_text_only_and_size_multiple_of_32(ti2v_pipe):
    assert _gen(ti2v_pipe, size=(64, 32)).tensor.shape == (3, 5, 32, 64)
    with pytest.raises(ValueError, match="divisible by 32"):
        _gen(ti2v_pipe, size=(48, 64))


def test_ti2v_image_first_frame_is_kept(ti2v_pipe, monkeypatch):
    seen = []
    model = ti2v_pipe.experts[0]
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, t, c, **kw: seen.append(t.clone()) or forward(x, t, c, **kw))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    video = _gen(ti2v_pipe, image=img)
    assert video.tensor.shape == (3, 5, 64, 64)
    tokens_per_frame = (64 // 16 // 2) ** 2
    for t in seen:  # first-frame tokens run at t = 0, the rest at the step's t
        assert t.shape == (2, 2 * tokens_per_frame)
        assert t[:, :tokens_per_frame].eq(0).all() and t[:, tokens_per_frame:].gt(0).all()


def test_best_output_size_matches_official_examples():
    assert best_output_size(1280, 720, 32, 32, 1280 * 704) == (1248, 704)
    assert best_output_size(720, 1280, 32, 32, 704 * 1280) == (704, 1248)
    ow, oh = best_output_size(1000, 1000, 32, 32, 1280 * 704)
    assert ow % 32 == 0 and oh % 32 == 0 and ow * oh <= 1280 * 704


def test_per_token_timesteps_zero_first_frame():
    mask = torch.ones(48, 3, 4, 4)
    mask[:, 0] = 0
    t = per_token_timesteps(mask, torch.tensor(900), (1, 2, 2))
    assert t.shape == (1, 12) and t[0, :4].eq(0).all() and t[0, 4:].eq(900).all()


def test_wanx_json_task_overrides_are_read(t2v_dir):
    meta = json.loads((t2v_dir / "wanx.json").read_text())
    pipe = wanx.load_pipeline(t2v_dir)
    assert pipe.spec.default_size == meta["task"]["default_size"]
    assert pipe.spec.frame_num == meta["task"]["frame_num"]


def test_tiled_decode_close_to_whole(t2v_dir):
    whole = _gen(wanx.load_pipeline(t2v_dir)).tensor
    tiled = _gen(wanx.load_pipeline(t2v_dir, vae_tiling=True), progress=True).tensor
    assert tiled.shape == whole.shape
    # 64x64 fits in one default tile, so tiling must change nothing here.
    assert torch.allclose(tiled, whole, atol=1e-5)
