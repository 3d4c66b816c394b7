"""Wan 2.1 / 2.2 VAE: official layout, parity with diffusers, causal invariants, tiling, streaming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wanx.configs import VAEConfig
from wanx.loading.vae import vae_official_to_diffusers
from wanx.vae import CausalCache, TileSpec, WanVAE, patchify, unpatchify
from wanx.vae.causal import REP, Resample, upsample2x_conv
from wanx.vae.tiling import Blender, spans
from wanx.vae.wan22 import AvgDown3D

VERSIONS = ["2.1", "2.2"]


def randomized(cfg: VAEConfig, seed: int = 0) -> WanVAE:
    """A VAE whose every parameter is random (norm gammas too), at a scale that keeps activations O(1)."""
    torch.manual_seed(seed)
    model = WanVAE(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


def video(f: int, h: int, w: int, b: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def tiny():
    return {v: randomized(VAEConfig.tiny(v)) for v in VERSIONS}


# ------------------------------------------------------------------------------ official layout
def test_official_state_dict_layout():
    with torch.device("meta"):
        v21, v22 = WanVAE(VAEConfig.wan21()), WanVAE(VAEConfig.wan22())
    k21, k22 = v21.state_dict(), v22.state_dict()
    assert {int(k.split(".")[2]) for k in k21 if k.startswith("encoder.downsamples.")} == set(range(11))
    assert {int(k.split(".")[2]) for k in k21 if k.startswith("decoder.upsamples.")} == set(range(15))
    assert "decoder.upsamples.3.time_conv.weight" in k21 and "encoder.downsamples.2.resample.1.weight" in k21
    assert k21["decoder.upsamples.3.resample.1.weight"].shape == (192, 384, 3, 3)  # 2.1 halves channels
    assert k21["encoder.conv1.weight"].shape == (96, 3, 3, 3, 3)
    assert k21["encoder.head.0.gamma"].shape == (384, 1, 1, 1)
    assert k21["encoder.middle.1.norm.gamma"].shape == (384, 1, 1)
    assert "encoder.downsamples.3.downsamples.1.residual.6.weight" in k22
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in k22
    assert k22["encoder.conv1.weight"].shape == (160, 12, 3, 3, 3)
    assert k22["decoder.conv1.weight"].shape == (1024, 48, 3, 3, 3)
    assert k22["decoder.head.2.weight"].shape == (12, 256, 3, 3, 3)
    assert k22["conv1.weight"].shape == (96, 96, 1, 1, 1) and k22["conv2.weight"].shape == (48, 48, 1, 1, 1)
    # Parameter counts measured for diffusers AutoencoderKLWan (126.9 M / 704.7 M).
    assert round(sum(p.numel() for p in v21.parameters()) / 1e6, 1) == 126.9
    assert round(sum(p.numel() for p in v22.parameters()) / 1e6, 1) == 704.7


def test_config_must_match_latent_statistics():
    with pytest.raises(ValueError, match="latents_mean/std need 8"):
        WanVAE(VAEConfig.tiny("2.1", z_dim=8))


# ------------------------------------------------------------------------------ diffusers parity
def _diffusers_twin(model: WanVAE):
    from diffusers import AutoencoderKLWan

    cfg = model.cfg
    kw = dict(base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample),
              latents_mean=list(cfg.mean), latents_std=list(cfg.std))
    if cfg.version == "2.2":
        kw.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    twin = AutoencoderKLWan(**kw).eval()
    twin.load_state_dict(vae_official_to_diffusers(model.state_dict(), cfg.version), strict=True)
    return twin


def _check_parity(model: WanVAE, x: torch.Tensor, label: str) -> None:
    twin = _diffusers_twin(model)
    mean = torch.tensor(model.cfg.mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.cfg.std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = model.encode(x)
        # diffusers returns the raw posterior; the pipelines normalise it.
        z_ref = (twin.encode(x).latent_dist.mode() - mean) / std
        y = model.decode(z, clamp=False)
        y_ref = twin.decode(z * std + mean).sample  # clamped by diffusers
    e_enc, e_dec = rel_err(z, z_ref), rel_err(y.clamp(-1, 1), y_ref)
    print(f"\n{label}: encode max rel err {e_enc:.2e}, decode max rel err {e_dec:.2e}")
    assert z.shape == z_ref.shape and y.shape == y_ref.shape
    assert e_enc <= 1e-5 and e_dec <= 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_parity_with_diffusers_tiny(tiny, version):
    _check_parity(tiny[version], video(5, 32, 32), f"tiny {version}")


def test_parity_with_diffusers_real_width_wan21():
    model = randomized(VAEConfig.wan21())
    _check_parity(model, video(5, 16, 16), "real-width 2.1 (5x16x16)")


def test_parity_with_diffusers_three_stage_wan21():
    """A 2.1 VAE with one downsampling stage fewer (4x4x4; the demo model's layout)."""
    cfg = VAEConfig.tiny("2.1", dim_mult=(1, 2, 4), temperal_downsample=(True, True))
    _check_parity(randomized(cfg), video(9, 16, 24), "three-stage 2.1 (9x16x24)")


# ------------------------------------------------------------------------------ shapes and errors
@pytest.mark.parametrize("version, dim_mult, temporal, strides", [
    ("2.1", (1, 2, 4, 4), (False, True, True), (4, 8, 8)),
    ("2.2", (1, 2, 4, 4), (False, True, True), (4, 16, 16)),
    ("2.1", (1, 2, 4), (True, True), (4, 4, 4)),
])
def test_strides_follow_the_stages(version, dim_mult, temporal, strides):
    cfg = VAEConfig.tiny(version, dim_mult=dim_mult, temperal_downsample=temporal)
    assert cfg.strides == strides
    model = WanVAE(cfg).eval()
    frames = 2 * strides[0] + 1
    with torch.no_grad():
        z = model.encode(video(frames, 2 * strides[1], strides[1]))
        assert z.shape[2:] == (3, 2, 1)
        assert model.decode(z).shape[2:] == (frames, 2 * strides[1], strides[1])


def test_temporal_flags_must_match_the_stages():
    with pytest.raises(ValueError, match="one flag per downsampling stage"):
        VAEConfig.tiny("2.1", dim_mult=(1, 2, 4), temperal_downsample=(False, True, True))
    with pytest.raises(ValueError, match="exactly two stages must downsample in time"):
        VAEConfig.tiny("2.1", dim_mult=(1, 2, 4), temperal_downsample=(False, True))


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("frames", [1, 5, 17])
def test_round_trip_shapes(tiny, version, frames):
    model, s = tiny[version], tiny[version].spatial_stride
    with torch.no_grad():
        z = model.encode(video(frames, 2 * s, 3 * s))
        assert z.shape == (1, model.z_dim, (frames - 1) // 4 + 1, 2, 3) and z.dtype == torch.float32
        y = model.decode(z)
    assert y.shape == (1, 3, frames, 2 * s, 3 * s)
    assert y.abs().max() <= 1.0


@pytest.mark.parametrize("frames", [0, 2, 4, 8, 16])
def test_bad_frame_count_is_rejected(tiny, frames):
    with pytest.raises(ValueError, match=f"got {frames} frames"):
        tiny["2.1"].encode(torch.zeros(1, 3, frames, 16, 16))


def test_bad_shapes_are_rejected(tiny):
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny["2.2"].encode(torch.zeros(1, 3, 5, 24, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, F, H, W\]"):
        tiny["2.1"].encode(torch.zeros(3, 5, 16, 16))
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        tiny["2.1"].decode(torch.zeros(1, 48, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\[B, 16, T, h, w\]"):
        tiny["2.1"].decode_stream(torch.zeros(1, 48, 2, 2, 2))  # checked at the call, not at next()
    with pytest.raises(ValueError, match="multiples of the VAE spatial stride 8"):
        tiny["2.1"].decode(torch.zeros(1, 16, 2, 2, 2), tile=TileSpec(tile=20, overlap=4))


# ------------------------------------------------------------------------------ causal invariants
@pytest.mark.parametrize("version", VERSIONS)
def test_encoder_is_causal(tiny, version):
    model = tiny[version]
    x = video(13, 32, 32)
    x2 = x.clone()
    x2[:, :, 6] += 0.5  # frame 6 lies in the chunk [5, 9) -> latent frame 2
    with torch.no_grad():
        z, z2 = model.encode(x), model.encode(x2)
    assert torch.equal(z[:, :, :2], z2[:, :, :2])
    assert not torch.allclose(z[:, :, 2:], z2[:, :, 2:])


@pytest.mark.parametrize("version", VERSIONS)
def test_decoder_is_causal(tiny, version):
    model = tiny[version]
    z = torch.randn(1, model.z_dim, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    z2 = z.clone()
    z2[:, :, 2] += 1.0  # latent frame 2 -> pixel frames 5..8
    with torch.no_grad():
        y, y2 = model.decode(z, clamp=False), model.decode(z2, clamp=False)
    assert torch.equal(y[:, :, :5], y2[:, :, :5])
    assert not torch.allclose(y[:, :, 5:], y2[:, :, 5:])


@pytest.mark.parametrize("version", VERSIONS)
def test_streaming_equals_whole_decode(tiny, version):
    model = tiny[version]
    z = torch.randn(1, model.z_dim, 4, 2, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        chunks = list(model.decode_stream(z))
        whole = model.decode(z)
    assert [c.shape[2] for c in chunks] == [1, 4, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), whole)


def test_batch_of_two_equals_two_batches_of_one(tiny):
    model = tiny["2.2"]
    x = video(5, 16, 32, b=2)
    with torch.no_grad():
        z = model.encode(x)
        z0, z1 = model.encode(x[:1]), model.encode(x[1:])
        y = model.decode(z)
        y0 = model.decode(z[:1])
    torch.testing.assert_close(z, torch.cat([z0, z1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:1], y0, rtol=1e-5, atol=1e-5)


def test_cache_is_explicit_and_calls_are_independent(tiny):
    model = tiny["2.1"]
    x = video(5, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.encode(x), model.encode(x))
    assert not any(isinstance(v, (list, CausalCache)) for v in vars(model).values())


def test_upsample3d_rep_marker_states():
    """First chunk: "Rep" and no time upsampling; then zero-padded conv and a [zeros, frame] cache."""
    torch.manual_seed(0)
    layer = Resample(4, "upsample3d", out_dim=2).eval()
    cache = CausalCache()
    x = torch.randn(1, 4, 1, 3, 3)
    with torch.no_grad():
        assert layer(x, cache).shape == (1, 2, 1, 6, 6)
        assert cache.get(layer) is REP
        cache.next_chunk()
        y = layer(x, cache)
        state = cache.get(layer)
        assert y.shape == (1, 2, 2, 6, 6)
        assert torch.equal(state[:, :, :1], torch.zeros_like(x)) and torch.equal(state[:, :, 1:], x)
        # Rep: the time conv saw two zero frames, not the first chunk.
        expect = F.conv3d(F.pad(x, (0, 0, 0, 0, 2, 0)), layer.time_conv.weight, layer.time_conv.bias)
        torch.testing.assert_close(layer.time_conv.conv(x), expect, rtol=1e-6, atol=1e-6)


def test_avgdown_zero_pads_a_single_frame():
    x = torch.randn(1, 4, 1, 2, 2)
    out = AvgDown3D(4, 4, factor_t=2, factor_s=2)(x)
    # parity: a 1-frame chunk is front-padded with a zero frame that joins the average, so each
    # channel's output is half the mean of its 4 pixels.
    assert out.shape == (1, 4, 1, 1, 1)
    torch.testing.assert_close(out.flatten(), x.flatten(2).mean(-1).flatten() / 2)


def test_patchify_channel_order():
    x = torch.arange(3 * 4 * 4, dtype=torch.float32).view(1, 3, 1, 4, 4)
    p = patchify(x)
    assert p.shape == (1, 12, 1, 2, 2)
    for c in range(3):
        for q in range(2):  # height sub-index
            for r in range(2):  # width sub-index
                # parity: channel = c*4 + r*2 + q (width sub-index before height)
                assert torch.equal(p[0, c * 4 + r * 2 + q, 0], x[0, c, 0, q::2, r::2])
    assert torch.equal(unpatchify(p), x)


def test_subpixel_upsample_conv_matches_nearest_then_conv():
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(2, 6, 3, 5, 7, generator=g), torch.randn(4, 6, 3, 3, generator=g), torch.randn(4, generator=g)
    ref = F.conv3d(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest-exact"), w.unsqueeze(2), b, padding=(0, 1, 1))
    torch.testing.assert_close(upsample2x_conv(x, w, b), ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ tiling
def test_blender_reassembles_a_tensor_exactly():
    t = torch.randn(1, 2, 3, 40, 52)
    ys, xs = spans(40, 16, 6), spans(52, 16, 6)
    assert ys[0][0] == 0 and ys[-1][1] == 40 and len(xs) > 2
    blend = Blender(t.shape, ys, xs, t.device, t.dtype)
    for iy, (y0, y1) in enumerate(ys):
        for ix, (x0, x1) in enumerate(xs):
            blend.add(iy, ix, t[..., y0:y1, x0:x1])
    torch.testing.assert_close(blend.result(), t, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("version", VERSIONS)
def test_single_tile_equals_untiled(tiny, version):
    model = tiny[version]
    x = video(5, 32, 32)
    with torch.no_grad():
        z = model.encode(x)
        assert torch.equal(model.encode(x, tile=TileSpec(tile=64, overlap=16)), z)
        assert torch.equal(model.decode(z, tile=TileSpec(tile=64, overlap=16)), model.decode(z))


@pytest.mark.parametrize("version", VERSIONS)
def test_tiled_close_to_untiled(version):
    """Tiles see zero padding at their seams, so tiling approximates the untiled result.

    Stated tolerance, for a default-initialised tiny model on a 6x6-latent frame cut into 2x2
    tiles of 4 latents with 2 of overlap (seams everywhere; real tiles are 4-8x larger):
    mean |diff| <= 50% of the mean |value| for latents and for pixels, max pixel |diff| < 1.
    The exact parts of tiling (blend weights, single tile == untiled) are tested separately.
    """
    torch.manual_seed(0)
    model = WanVAE(VAEConfig.tiny(version)).eval()
    s = model.spatial_stride
    spec = TileSpec(tile=4 * s, overlap=2 * s)
    x = video(1, 6 * s, 6 * s)
    with torch.no_grad():
        z = model.encode(x)
        zt = model.encode(x, tile=spec)
        y = model.decode(z)
        yt = model.decode(z, tile=spec)
    assert zt.shape == z.shape and yt.shape == y.shape
    dz, dy = (zt - z).abs().mean() / z.abs().mean(), (yt - y).abs().mean() / y.abs().mean()
    print(f"\ntiled vs untiled {version}: latents rel mean diff {dz:.3f}, pixels rel mean diff {dy:.3f}, "
          f"pixels max diff {(yt - y).abs().max():.3f}")
    assert dz <= 0.5 and dy <= 0.5 and (yt - y).abs().max() < 1.0


@pytest.mark.parametrize("version", VERSIONS)
def test_tiled_streaming_equals_tiled_decode(tiny, version):
    model = tiny[version]
    z = torch.randn(1, model.z_dim, 3, 3, 4, generator=torch.Generator().manual_seed(7))
    spec = TileSpec(tile=2 * model.spatial_stride, overlap=model.spatial_stride)
    with torch.no_grad():
        chunks = list(model.decode_stream(z, tile=spec))
        whole = model.decode(z, tile=spec)
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks, dim=2), whole)
    assert whole.shape == (1, 3, 9, 3 * model.spatial_stride, 4 * model.spatial_stride)


# ------------------------------------------------------------------------------ gradients, dtype
@pytest.mark.parametrize("version", VERSIONS)
def test_gradients_flow_and_match_inference(tiny, version):
    model = tiny[version]
    x = video(5, 16, 16).requires_grad_(True)
    z = model.encode(x)
    y = model.decode(z, clamp=False)
    y.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.encoder.conv1.weight.grad is not None and model.decoder.head[2].weight.grad is not None
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.decode(z, clamp=False), y, rtol=1e-5, atol=1e-5)


def test_clamp_false_returns_raw_output():
    model = randomized(VAEConfig.tiny("2.1"))
    with torch.no_grad():
        model.decoder.head[2].weight.mul_(50.0)
        z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(6))
        raw, clamped = model.decode(z, clamp=False), model.decode(z)
    assert raw.abs().max() > 1.0
    torch.testing.assert_close(clamped, raw.clamp(-1, 1))


def test_bfloat16_runs_close_to_fp32(tiny):
    model = tiny["2.1"]
    x = video(5, 16, 16)
    with torch.no_grad():
        z, y = model.encode(x), model.decode(model.encode(x))
        half = WanVAE(model.cfg).to(torch.bfloat16).eval()
        half.load_state_dict(model.state_dict())
        zb = half.encode(x)
        yb = half.decode(z)
    assert zb.dtype == torch.float32 and yb.dtype == torch.float32
    assert rel_err(zb, z) < 0.1 and (yb - y).abs().mean() < 0.05


def test_onednn_conv3d_and_square_sum_norm_match_the_reference_ops(monkeypatch):
    """The CPU fast paths (direct oneDNN conv3d at batch 1, square-sum RMS norm) compute the same
    values as F.conv3d / F.normalize, and training (grad) keeps the autograd-friendly ops."""
    from wanx.vae.causal import RMSNorm, conv3d

    torch.manual_seed(0)
    x = torch.randn(1, 8, 4, 12, 10)
    w, b = torch.randn(6, 8, 3, 3, 3), torch.randn(6)
    for stride, padding in ((1, (0, 1, 1)), ((1, 2, 2), 0)):
        want = F.conv3d(x, w, b, stride, padding)
        with torch.no_grad():
            got = conv3d(x, w, b, stride, padding)
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
    wg = w.clone().requires_grad_(True)
    conv3d(x, wg, b, 1, 1).sum().backward()  # autograd path
    assert wg.grad is not None
    norm = RMSNorm(8)
    want = F.normalize(x, dim=1) * 8**0.5
    small = norm(x)
    monkeypatch.setattr(RMSNorm, "SQUARE_SUM_ELEMENTS", 0)  # force the vector_norm branch
    big = norm(x)
    for got in (small, big):
        assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-6
