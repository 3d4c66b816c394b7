"""The S2V transformer: official keys, and parity with the official modules on random fp32 weights.

Each part is compared on its own (audio encoder, audio injection, frame packer, positions), then
the whole forward with and without pose and with and without motion tokens. Every comparison
prints its relative error (max |diff| / max |reference|) and is bounded by 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from wanx.configs import TASKS, S2VConfig
from wanx.model import attention_backend
from wanx.model.s2v import WanS2VDiT
from wanx.model.s2v_motion import motion_positions, position_table, reference_positions, video_positions

from helpers_s2v import (GRID, make_inputs, official_kwargs, official_s2v_modules, randomize_, rel_err, run_official,
                         run_ours)

TOL = 1e-5


@pytest.fixture(scope="module")
def official():
    return official_s2v_modules()


@pytest.fixture(scope="module")
def twins(official):
    """(official WanModel_S2V, our WanS2VDiT) with the same random fp32 weights."""
    cfg = S2VConfig.tiny()
    torch.manual_seed(0)
    ref = official.model_s2v.WanModel_S2V(**official_kwargs(cfg)).eval()
    randomize_(ref)
    ours = WanS2VDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


# ------------------------------------------------------------------------------------------ structure

def test_state_dict_keys_and_shapes_match_the_official(twins):
    ref, ours = twins
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert not list(ours.buffers())


def test_full_size_model_on_meta():
    cfg = TASKS["s2v-14B"].dit
    with torch.device("meta"):
        model = WanS2VDiT(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"s2v-14B: {n / 1e9:.4f} B parameters, {len(model.state_dict())} tensors")
    assert len(model.audio_injector.injector) == 12
    assert model.casual_audio_encoder.encoder.conv1_local.conv.weight.shape == (5120, 1024, 3)
    assert 15.5 < n / 1e9 < 16.5  # the 14.29 B Wan DiT + ~1.7 B of audio, pose and motion modules


@pytest.mark.parametrize("change, message", [
    (dict(enable_motioner=True, enable_framepack=False), "frame packer"),
    (dict(adain_mode="normal"), "adaptive norm"),
    (dict(audio_inject_layers=(0, 5)), "outside"),
])
def test_unreleased_variants_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        WanS2VDiT(S2VConfig.tiny(**change))


# --------------------------------------------------------------------------------------- module parity

def test_audio_encoder_parity(twins):
    ref, ours = twins
    feats = torch.randn(2, 25, 32, 153, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        glob_ref, local_ref = ref.casual_audio_encoder(feats)
        local, glob = ours.casual_audio_encoder(feats)
    err_l, err_g = rel_err(local, local_ref), rel_err(glob, glob_ref)
    print(f"audio encoder: local tokens rel err {err_l:.2e}, global {err_g:.2e}")
    assert local.shape == local_ref.shape == (2, 39, 5, 64) and glob.shape == glob_ref.shape == (2, 39, 1, 64)
    assert err_l <= TOL and err_g <= TOL


def test_audio_injection_parity(twins):
    ref, ours = twins
    g = torch.Generator().manual_seed(6)
    t_, s = 3, 8
    hidden = torch.randn(1, t_ * s + 5, 64, generator=g)  # 3 frames of 8 video tokens + 5 others
    audio = torch.randn(1, t_, 5, 64, generator=g)
    audio_global = torch.randn(1, t_, 1, 64, generator=g)
    ref.merged_audio_emb, ref.audio_emb_global, ref.original_seq_len = audio, audio_global, t_ * s
    for block in (0, 1):
        with torch.no_grad(), attention_backend("math"):
            expected = ref.after_transformer_block(block, hidden.clone())
            out = ours.audio_injector(block, hidden.clone(), t_ * s, audio, audio_global)
        err = rel_err(out - hidden, expected - hidden)
        print(f"audio injection after block {block}: rel err of the residual {err:.2e}")
        assert err <= TOL and torch.equal(out[:, t_ * s:], hidden[:, t_ * s:])


@pytest.mark.parametrize("frames", [19, 5, 25])
@pytest.mark.parametrize("add_last", [2, 0])
def test_frame_packer_parity(twins, frames, add_last):
    """Tokens and their positions; fewer than 19 latents are zero-padded, more are cut to the last 19."""
    ref, ours = twins
    motion = torch.randn(1, 16, frames, 8, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        mot, remb = ref.frame_packer(motion, add_last)
        tokens = ours.frame_packer(motion, add_last)
    table = position_table(motion_positions(4, 8), ours.cfg.head_dim)  # [Lm, 1, D/2]
    err = rel_err(tokens, mot[0])
    rope_err = (table[:, 0] - remb[0][0, :, 0]).abs().max().item()
    print(f"frame packer ({frames} latents, add_last_motion {add_last}): tokens rel err {err:.2e}, "
          f"positions max |diff| {rope_err:.2e}")
    assert tokens.shape == mot[0].shape == (1, 4 * 8 + 2 * 4 + 4 * 1 * 2, 64)
    assert err <= TOL and rope_err <= 1e-6


@pytest.mark.parametrize("drop", [False, True])
def test_positions_match_the_official_table(twins, drop):
    """The whole sequence's rotations: video from frame 0, reference at 30, motion at -1/-3/-19.."""
    ref, ours = twins
    inp = make_inputs(ours.cfg)
    with torch.no_grad(), attention_backend("math"):
        run_official(ref, inp, torch.tensor([500.0]), pose=True, drop=drop)
    expected = ref.pre_compute_freqs[0, :, 0]  # [L, D/2] complex128
    blocks = [video_positions((3, 4, 8)), reference_positions(4, 8)] + ([] if drop else motion_positions(4, 8))
    table = position_table(blocks, ours.cfg.head_dim)[:, 0]
    err = (table - expected).abs().max().item()
    print(f"positions (motion dropped={drop}): {table.shape[0]} tokens, max |diff| {err:.2e}")
    assert table.shape == expected.shape and err <= 1e-6
    assert [b.frames for b in motion_positions(4, 8)] == [(-1,), (-3,), (-19, -14, -9, -4)]


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("pose, drop", [(True, False), (False, False), (True, True), (False, True)])
def test_forward_parity(twins, pose, drop):
    ref, ours = twins
    inp = make_inputs(ours.cfg)
    t = torch.tensor([937.0])
    with torch.no_grad(), attention_backend("math"):
        expected = run_official(ref, inp, t, pose=pose, drop=drop)
        out = run_ours(ours, inp, t, pose=pose, drop=drop)
    err = rel_err(out[0], expected)
    print(f"forward (pose={pose}, motion dropped={drop}): rel err {err:.2e}")
    assert out.shape == (1, 16, *GRID) and out.dtype == torch.float32
    assert expected.abs().max() > 0.1 and err <= TOL


# ------------------------------------------------------------------------------------------ invariants

def test_inputs_matter_and_batch_of_two_equals_singles(twins):
    """Batched CFG's shape: two samples (second with zero audio) == two single passes."""
    _, ours = twins
    inp = make_inputs(ours.cfg, batch=2)
    inp["audio_input"][1] = 0
    t = torch.tensor([700.0, 700.0])
    with torch.no_grad():
        both = run_ours(ours, inp, t, pose=True, drop=False)
        singles = [run_ours(ours, {k: (v[i:i + 1] if v.shape[0] == 2 else v) for k, v in inp.items()},
                            t[:1], pose=True, drop=False) for i in range(2)]
    assert rel_err(both, torch.cat(singles)) <= TOL
    assert rel_err(both[0], both[1]) > 1e-3  # audio (and the prompt) change the prediction
