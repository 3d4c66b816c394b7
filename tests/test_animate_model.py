"""Animate-14B transformer: official keys, diffusers names, module and full-forward parity (fp32, random weights)."""

from __future__ import annotations

import pytest
import torch

from helpers_animate import (official_module, official_twin, patch_official_attention, randomize, rel_err,
                             run_official, tiny_inputs)
from wanx.configs import AnimateConfig
from wanx.loading.animate import (animate_diffusers_to_official, animate_official_to_diffusers, load_animate_dit,
                                  save_animate_dit)
from wanx.loading.safe import CheckpointError
from wanx.model.animate import WanAnimateDiT
from wanx.model.animate_face import FaceBlock, FaceEncoder, MotionEncoder
from wanx.model.attention import attention_backend

TOL = 1e-5
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def cfg():
    return AnimateConfig.tiny()


def _ours_from(ref, cfg) -> WanAnimateDiT:
    ours = WanAnimateDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours


def test_state_dict_keys_are_the_official_ones(cfg, monkeypatch):
    ref = official_twin(cfg, monkeypatch)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in WanAnimateDiT(cfg).state_dict().items()}
    assert ours == theirs


def test_motion_encoder_matches_official():
    official = official_module("modules.animate.motion_encoder")
    torch.manual_seed(0)
    ref = official.Generator(size=16, style_dim=512, motion_dim=20).eval()
    ours = MotionEncoder(16)
    ours.load_state_dict(ref.state_dict(), strict=True)
    faces = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        out, expected = ours(faces), ref.get_motion(faces)
    err = rel_err(out, expected)
    print(f"LIA motion encoder: max rel err vs official = {err:.2e}")
    assert expected.abs().max() > 0.01 and err <= TOL


def test_face_encoder_and_face_block_match_official(monkeypatch):
    patch_official_attention(monkeypatch)
    faces = official_module("modules.animate.face_blocks")
    torch.manual_seed(0)
    enc_ref = faces.FaceEncoder(in_dim=512, hidden_dim=64, num_heads=4)
    block_ref = faces.FaceBlock(64, 2)
    randomize(enc_ref, seed=1)
    randomize(block_ref, seed=2)
    enc, block = FaceEncoder(512, 64), FaceBlock(64, 2)
    enc.load_state_dict(enc_ref.state_dict(), strict=True)
    block.load_state_dict(block_ref.state_dict(), strict=True)
    motion = torch.randn(1, 9, 512)
    x = torch.randn(1, 3 * 6, 64)
    with torch.no_grad(), attention_backend("math"):
        tokens, tokens_ref = enc(motion), enc_ref(motion)
        out, out_ref = block(x, tokens), block_ref(x, tokens)
    assert tokens.shape == (1, 3, 5, 64)  # 9 frames -> 3 latent frames, 4 heads + 1 padding token
    for name, a, b in (("face encoder", tokens, tokens_ref), ("face block", out, out_ref)):
        err = rel_err(a, b)
        print(f"{name}: max rel err vs official = {err:.2e}")
        assert b.abs().max() > 0.01 and err <= TOL


def test_image_cross_attention_matches_official(cfg, monkeypatch):
    patch_official_attention(monkeypatch)
    model = official_module("modules.animate.model_animate")
    ref = model.WanAnimateCrossAttention(cfg.dim, cfg.num_heads).eval()
    randomize(ref, seed=3)
    ours = WanAnimateDiT(cfg).blocks[0].cross_attn
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, ctx = torch.randn(1, 12, cfg.dim), torch.randn(1, 257 + 20, cfg.dim)
    with torch.no_grad(), attention_backend("math"):
        out, expected = ours(x, context=ctx), ref(x, ctx, None)
    err = rel_err(out, expected)
    print(f"image cross-attention: max rel err vs official = {err:.2e}")
    assert err <= TOL


def test_forward_matches_official(cfg, monkeypatch):
    ref = official_twin(cfg, monkeypatch)
    ours = _ours_from(ref, cfg)
    inputs = tiny_inputs(cfg)
    with torch.no_grad(), attention_backend("math"):
        out = ours(inputs[0], inputs[1], inputs[2], clip_fea=inputs[3], y=inputs[4], pose_latents=inputs[5],
                   face_pixels=inputs[6])
        expected = run_official(ref, *inputs)
    err = rel_err(out[0], expected)
    print(f"Animate forward: max rel err vs official = {err:.2e}")
    assert out.shape == (1, 16, 3, 4, 6) and expected.abs().max() > 0.1 and err <= TOL


def test_precomputed_motion_tokens_give_the_same_output(cfg, monkeypatch):
    ref = official_twin(cfg, monkeypatch)
    ours = _ours_from(ref, cfg)
    x, t, ctx, clip, y, pose, face = tiny_inputs(cfg)
    with torch.no_grad():
        a = ours(x, t, ctx, clip_fea=clip, y=y, pose_latents=pose, face_pixels=face)
        b = ours(x, t, ctx, clip_fea=clip, y=y, pose_latents=pose, motion_vec=ours.encode_face(face))
        c = ours(x, t, ctx, clip_fea=clip, y=y, pose_latents=pose, face_pixels=-torch.ones_like(face))
    assert torch.equal(a, b)
    assert rel_err(a, c) > 1e-3  # the face branch really changes the output


def _diffusers_twin(cfg, ref):
    diffusers = pytest.importorskip("diffusers")
    from wanx.loading.animate import animate_config_to_json
    config = {k: v for k, v in animate_config_to_json(cfg, "diffusers").items() if not k.startswith("_")}
    model = diffusers.WanAnimateTransformer3DModel(**config).eval()
    missing, unexpected = model.load_state_dict(animate_official_to_diffusers(ref.state_dict()), strict=True)
    return model


def test_forward_matches_diffusers(cfg, monkeypatch):
    ref = official_twin(cfg, monkeypatch)
    ours = _ours_from(ref, cfg)
    theirs = _diffusers_twin(cfg, ref)
    x, t, ctx, clip, y, pose, face = tiny_inputs(cfg)
    ctx512 = torch.cat([ctx, ctx.new_zeros(1, cfg.text_len - ctx.shape[1], ctx.shape[2])], dim=1)
    with torch.no_grad(), attention_backend("math"):
        out = ours(x, t, ctx, clip_fea=clip, y=y, pose_latents=pose, face_pixels=face)
        expected = theirs(torch.cat([x, y], 1), t, ctx512, encoder_hidden_states_image=clip,
                          pose_hidden_states=pose, face_pixel_values=face, return_dict=False)[0]
    err = rel_err(out, expected)
    print(f"Animate forward: max rel err vs diffusers = {err:.2e}")
    assert expected.abs().max() > 0.1 and err <= TOL


def test_key_maps_round_trip_and_match_diffusers_names(cfg):
    model = WanAnimateDiT(cfg)
    randomize(model)
    sd = model.state_dict()
    dif = animate_official_to_diffusers(sd)
    diffusers = pytest.importorskip("diffusers")
    from wanx.loading.animate import animate_config_to_json
    config = {k: v for k, v in animate_config_to_json(cfg, "diffusers").items() if not k.startswith("_")}
    theirs = diffusers.WanAnimateTransformer3DModel(**config).state_dict()
    assert {k: tuple(v.shape) for k, v in dif.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    back = animate_diffusers_to_official(dif)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_both_layouts_load_strictly(cfg, tmp_path, layout):
    model = WanAnimateDiT(cfg)
    randomize(model)
    save_animate_dit(model, tmp_path / layout, layout=layout)
    loaded = load_animate_dit(tmp_path / layout)
    assert loaded.cfg == cfg
    sd, got = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], got[k]) for k in sd)


def test_a_missing_tensor_is_named(cfg, tmp_path):
    from safetensors.torch import load_file, save_file
    model = WanAnimateDiT(cfg)
    folder = save_animate_dit(model, tmp_path / "m")
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del sd["face_adapter.fuser_blocks.0.linear1_kv.weight"]
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="linear1_kv"):
        load_animate_dit(folder)


def test_bf16_weights_run_and_stay_close_to_fp32(cfg):
    model = WanAnimateDiT(cfg).eval()
    randomize(model)
    x, t, ctx, clip, y, pose, face = tiny_inputs(cfg)
    with torch.no_grad():
        full = model(x, t, ctx, clip_fea=clip, y=y, pose_latents=pose, face_pixels=face)
        half = model.to(torch.bfloat16)(x, t, ctx, clip_fea=clip, y=y, pose_latents=pose, face_pixels=face)
    err = rel_err(half, full)
    print(f"bf16 weights vs fp32: max rel err = {err:.2e}")
    assert half.dtype == torch.float32 and err < 3e-2
