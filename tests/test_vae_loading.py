"""Loading, converting and saving Wan VAEs: official .pth/.safetensors, diffusers folders, key maps, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from wanx.configs import VAEConfig
from wanx.loading.safe import CheckpointError
from wanx.loading.vae import (
    convert_vae,
    infer_vae_config,
    load_vae,
    save_vae,
    vae_diffusers_to_official,
    vae_official_to_diffusers,
)
from wanx.vae import WanVAE

VERSIONS = ["2.1", "2.2"]


def tiny_model(version: str, seed: int = 0, **kw) -> WanVAE:
    torch.manual_seed(seed)
    model = WanVAE(VAEConfig.tiny(version, **kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def diffusers_kwargs(cfg: VAEConfig) -> dict:
    kw = dict(base_dim=cfg.dim, decoder_base_dim=cfg.dec_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, temperal_downsample=list(cfg.temperal_downsample),
              latents_mean=list(cfg.mean), latents_std=list(cfg.std))
    if cfg.version == "2.2":
        kw.update(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    return kw


def assert_same_weights(a: WanVAE, b: WanVAE) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ key maps
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("size", ["tiny", "real"])
def test_key_maps_match_diffusers_and_are_inverses(version, size):
    from diffusers import AutoencoderKLWan

    if size == "tiny":
        cfg = VAEConfig.tiny(version)
    else:
        cfg = VAEConfig.wan21() if version == "2.1" else VAEConfig.wan22()
    with torch.device("meta"):
        ours = WanVAE(cfg).state_dict()
        theirs = AutoencoderKLWan(**diffusers_kwargs(cfg)).state_dict()
    mapped = vae_official_to_diffusers(ours, version)
    assert set(mapped) == set(theirs)
    assert all(mapped[k].shape == theirs[k].shape for k in mapped)
    back = vae_diffusers_to_official(mapped, version)
    assert list(back) == list(ours) and all(back[k] is ours[k] for k in ours)


def test_key_map_examples():
    sd = WanVAE(VAEConfig.tiny("2.1")).state_dict()
    m = vae_official_to_diffusers(sd, "2.1")
    assert "decoder.up_blocks.0.upsamplers.0.time_conv.weight" in m  # flat upsamples.2 (1 res + 1)
    assert "decoder.up_blocks.1.resnets.0.conv_shortcut.weight" in m
    assert "quant_conv.weight" in m and "post_quant_conv.weight" in m
    m22 = vae_official_to_diffusers(WanVAE(VAEConfig.tiny("2.2")).state_dict(), "2.2")
    assert "encoder.down_blocks.1.downsampler.time_conv.weight" in m22
    assert "decoder.up_blocks.0.upsampler.resample.1.weight" in m22


# ------------------------------------------------------------------------------ config inference
@pytest.mark.parametrize("cfg", [VAEConfig.wan21(), VAEConfig.wan22(),
                                 VAEConfig.tiny("2.1", dim_mult=(1, 2, 4), temperal_downsample=(True, True)),
                                 VAEConfig.tiny("2.1", dim_mult=(1, 2, 2, 3),
                                                temperal_downsample=(True, False, True))],
                         ids=["wan21", "wan22", "three-stage", "tiny-odd"])
def test_infer_config_from_shapes(cfg):
    with torch.device("meta"):
        sd = WanVAE(cfg).state_dict()
    got = infer_vae_config(sd)
    for name in ("version", "dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        assert getattr(got, name) == getattr(cfg, name), name
    assert got.decoder_dim == cfg.decoder_dim


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_and_load_official_names(tmp_path, version, suffix):
    model = tiny_model(version)
    name = f"Wan{version}_VAE{suffix}"
    save_vae(model, tmp_path / name)
    loaded = load_vae(tmp_path / name)
    assert_same_weights(model, loaded)
    assert loaded.cfg.version == version and loaded.cfg.dim == model.cfg.dim
    if suffix == ".pth":  # a plain tensor dict, readable by the official loader
        raw = torch.load(tmp_path / name, weights_only=True)
        assert set(raw) == set(model.state_dict())
    else:  # safetensors carry the full config, latent statistics included
        assert loaded.cfg == model.cfg
    assert not any(p.requires_grad for p in loaded.parameters())


def test_official_folder_with_wanx_json(tmp_path):
    model = tiny_model("2.2")
    save_vae(model, tmp_path / "Wan2.2_VAE.pth")
    (tmp_path / "wanx.json").write_text(json.dumps({"vae": model.cfg.to_dict()}))
    assert load_vae(tmp_path).cfg == model.cfg


@pytest.mark.parametrize("version", VERSIONS)
def test_diffusers_folder_loads_and_matches(tmp_path, version):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(1)
    cfg = VAEConfig.tiny(version)
    ref = AutoencoderKLWan(**diffusers_kwargs(cfg)).eval()
    ref.save_pretrained(tmp_path / "vae")
    for path in (tmp_path, tmp_path / "vae"):
        model = load_vae(path)
        assert model.cfg.version == version and model.cfg.dim == cfg.dim
        assert model.cfg.decoder_dim == cfg.decoder_dim and model.cfg.z_dim == cfg.z_dim
        assert model.cfg.mean == cfg.mean and model.cfg.std == cfg.std
    s = model.spatial_stride
    x = torch.rand(1, 3, 5, 2 * s, 2 * s) * 2 - 1
    mean = torch.tensor(cfg.mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        z = model.encode(x)
        z_ref = (ref.encode(x).latent_dist.mode() - mean) / std
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5)

    convert_vae(tmp_path, tmp_path / "converted.safetensors")
    assert_same_weights(model, load_vae(tmp_path / "converted.safetensors"))


def test_diffusers_names_in_a_single_file(tmp_path):
    model = tiny_model("2.1")
    sd = vae_official_to_diffusers({k: v.contiguous() for k, v in model.state_dict().items()}, "2.1")
    save_file(sd, str(tmp_path / "vae_diffusers.safetensors"))
    assert_same_weights(model, load_vae(tmp_path / "vae_diffusers.safetensors"))


def test_dtype_and_version_arguments(tmp_path):
    model = tiny_model("2.1")
    save_vae(model, tmp_path / "v.pth")
    half = load_vae(tmp_path / "v.pth", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with pytest.raises(CheckpointError, match="Wan 2.1 VAE, but version='2.2'"):
        load_vae(tmp_path / "v.pth", version="2.2")


# ------------------------------------------------------------------------------ bad files
def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vae(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="has no Wan VAE"):
        load_vae(tmp_path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_vae(path)


class _Payload:
    """Any custom class: unpickling it would run arbitrary code paths."""

    def __init__(self):
        self.x = 1


def test_unsafe_pickle_is_refused(tmp_path):
    sd = dict(tiny_model("2.1").state_dict())
    sd["extra"] = _Payload()
    torch.save(sd, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match="arbitrary objects"):
        load_vae(tmp_path / "Wan2.1_VAE.pth")


def test_wrong_keys_are_named(tmp_path):
    sd = dict(tiny_model("2.1").state_dict())
    del sd["decoder.head.0.gamma"]
    sd["decoder.bogus.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "v.pth")
    named = r"missing keys.*decoder\.head\.0\.gamma.*unexpected keys.*decoder\.bogus"
    with pytest.raises(CheckpointError, match=named):
        load_vae(tmp_path / "v.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a Wan VAE"):
        load_vae(tmp_path / "other.pth")


def test_wrong_shapes_are_named(tmp_path):
    model = tiny_model("2.1")
    save_vae(model, tmp_path / "v.pth")
    bigger = VAEConfig.tiny("2.1", dim=16)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_vae(tmp_path / "v.pth", config=bigger)
