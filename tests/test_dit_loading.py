"""DiT checkpoints: key maps, config inference, every layout loads to the same model, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanx.configs import TASKS, DiTConfig
from wanx.loading.dit import (diffusers_to_official, dit_config_from_json, dit_config_from_state_dict,
                              dit_config_to_json, load_dit, official_to_diffusers, save_dit,
                              strip_single_file_prefix)
from wanx.loading.safe import CheckpointError
from wanx.model import WanDiT


SHARD = 300_000  # bytes: the tiny TI2V model (~0.8 MB in fp32) splits into a few shards


def tiny(model_type="t2v", seed=0) -> WanDiT:
    torch.manual_seed(seed)
    return WanDiT(DiTConfig.tiny(model_type)).eval()


def meta_model(cfg: DiTConfig) -> WanDiT:
    with torch.device("meta"):
        return WanDiT(cfg)


@pytest.fixture(scope="module")
def source():
    """A tiny TI2V model (per-token t path) and its output on fixed inputs."""
    m = tiny("ti2v")
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(1, 48, 2, 4, 4, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 32, generator=g))
    with torch.no_grad():
        return m, inputs, m(*inputs)


def assert_same_model(loaded: WanDiT, source):
    model, inputs, expected = source
    assert loaded.cfg == model.cfg
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    sd, ref = loaded.state_dict(), model.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    with torch.no_grad():
        out = loaded(*inputs)
    # Equal weights; the output may differ in the last bit only (CPU kernels depend on alignment).
    assert ((out - expected).abs().max() / expected.abs().max()).item() <= 1e-6


# -------------------------------------------------------------------------------------------- key maps

def test_key_maps_are_exact_inverses_and_match_diffusers_names():
    diffusers = pytest.importorskip("diffusers")
    cfg = DiTConfig.tiny("i2v")
    sd = tiny("i2v").state_dict()
    dsd = official_to_diffusers(sd)
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim,
            out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers)
    ref_sd = ref.state_dict()
    assert set(dsd) == set(ref_sd)
    assert all(dsd[k].shape == ref_sd[k].shape for k in dsd)
    assert "blocks.0.norm2.weight" in dsd and "blocks.0.norm3.weight" not in dsd  # the norm swap
    back = diffusers_to_official(dsd)
    assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)
    assert official_to_diffusers(back) == dsd


def test_key_maps_round_trip_full_size_keys():
    sd = meta_model(TASKS["t2v-A14B"].dit).state_dict()
    dsd = official_to_diffusers(sd)
    assert len(set(dsd)) == len(sd) == 1095 and not set(dsd) & {"head.modulation", "time_projection.1.weight"}
    assert diffusers_to_official(dsd) == sd


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_single_file_prefix_round_trip(prefix):
    sd = tiny().state_dict()
    assert strip_single_file_prefix({prefix + k: v for k, v in sd.items()}) == sd


def test_unknown_keys_pass_through_unchanged():
    odd = {"img_emb.proj.0.weight": torch.zeros(1), "blocks.0.cross_attn.k_img.weight": torch.zeros(1)}
    assert official_to_diffusers(odd) == odd and diffusers_to_official(odd) == odd


# --------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("task", ["t2v-A14B", "i2v-A14B", "ti2v-5B"])
def test_config_from_full_size_shapes(task):
    cfg = TASKS[task].dit
    assert dit_config_from_state_dict(meta_model(cfg).state_dict()) == cfg
    dsd = official_to_diffusers(meta_model(cfg).state_dict())
    assert dit_config_from_state_dict(dsd) == cfg


def test_config_from_tiny_shapes_needs_num_heads():
    cfg = DiTConfig.tiny("i2v")
    sd = tiny("i2v").state_dict()
    assert dit_config_from_state_dict(sd, num_heads=2) == cfg
    with pytest.raises(CheckpointError, match="num_heads"):
        dit_config_from_state_dict(sd)


def test_real_official_config_json():
    # The TI2V-5B config.json as shipped (no patch_size, text_dim, qk_norm ... keys).
    real = {"_class_name": "WanModel", "_diffusers_version": "0.33.0", "dim": 3072, "eps": 1e-06,
            "ffn_dim": 14336, "freq_dim": 256, "in_dim": 48, "model_type": "ti2v", "num_heads": 24,
            "num_layers": 30, "out_dim": 48, "text_len": 512}
    assert dit_config_from_json(real) == TASKS["ti2v-5B"].dit
    written = dit_config_to_json(TASKS["ti2v-5B"].dit)
    assert written == real


def test_official_config_json_round_trips_tiny_text_dim():
    cfg = DiTConfig.tiny("i2v")
    d = dit_config_to_json(cfg)
    assert d["text_dim"] == 32 and "patch_size" not in d and "qk_norm" not in d
    assert dit_config_from_json(json.loads(json.dumps(d))) == cfg


def test_diffusers_config_json():
    real = {"_class_name": "WanTransformer3DModel", "_diffusers_version": "0.35.0.dev0", "added_kv_proj_dim": None,
            "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
            "image_dim": None, "in_channels": 36, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
            "patch_size": [1, 2, 2], "pos_embed_seq_len": None, "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 1024, "text_dim": 4096}
    assert dit_config_from_json(real) == TASKS["i2v-A14B"].dit
    cfg = DiTConfig.tiny("ti2v")
    assert dit_config_from_json(json.loads(json.dumps(dit_config_to_json(cfg, "diffusers")))) == cfg
    with pytest.raises(CheckpointError, match="CLIP"):
        dit_config_from_json({**real, "image_dim": 1280, "added_kv_proj_dim": 5120})
    with pytest.raises(CheckpointError, match="unsupported DiT class"):
        dit_config_from_json({"_class_name": "WanModel_S2V"})


# --------------------------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("layout, shard", [("official", None), ("official", SHARD), ("diffusers", None),
                                           ("diffusers", SHARD)])
def test_folder_layouts_load_identically(tmp_path, source, layout, shard):
    folder = save_dit(source[0], tmp_path / "dit", layout=layout, max_shard_bytes=shard)
    cfg_json = json.loads((folder / "config.json").read_text())
    assert cfg_json["_class_name"] == ("WanModel" if layout == "official" else "WanTransformer3DModel")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if shard:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        assert len(shards) > 2 and not (folder / "diffusion_pytorch_model.safetensors").exists()
        assert shards[0] == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
        keys = set().union(*(load_file(folder / s).keys() for s in shards))
    else:
        assert not index.exists()
        keys = set(load_file(folder / "diffusion_pytorch_model.safetensors"))
    assert ("condition_embedder.time_proj.weight" in keys) == (layout == "diffusers")
    assert_same_model(load_dit(folder), source)


@pytest.mark.parametrize("prefix, diffusers_keys", [("", False), ("model.diffusion_model.", False),
                                                     ("diffusion_model.", False), ("", True)])
def test_single_file_loads_identically(tmp_path, source, prefix, diffusers_keys):
    path = tmp_path / "wan.safetensors"
    if diffusers_keys:
        save_file(official_to_diffusers(source[0].state_dict()), str(path))
    else:
        save_dit(source[0], path, layout="single_file", prefix=prefix)
    # A single file carries no config: tiny models need num_heads (real ones infer dim // 128).
    assert_same_model(load_dit(path, num_heads=2), source)
    assert_same_model(load_dit(path, config=source[0].cfg), source)


def test_dtype_and_device_on_load(tmp_path, source):
    folder = save_dit(source[0], tmp_path / "dit")
    m = load_dit(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in m.parameters())
    with torch.no_grad():
        out = m(*source[1])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert load_dit(folder, dtype="float32").patch_embedding.weight.dtype == torch.float32


def test_resave_replaces_old_shards(tmp_path, source):
    folder = save_dit(source[0], tmp_path / "dit", max_shard_bytes=SHARD)
    save_dit(source[0], folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_model(load_dit(folder), source)


# ---------------------------------------------------------------------------------------------- errors

def test_missing_shard_is_named(tmp_path, source):
    folder = save_dit(source[0], tmp_path / "dit", max_shard_bytes=SHARD)
    shards = sorted(p.name for p in folder.glob("*-of-*.safetensors"))
    assert len(shards) >= 3
    (folder / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{shards[1]}"):
        load_dit(folder)


def test_corrupt_shard_is_a_clear_error(tmp_path, source):
    folder = save_dit(source[0], tmp_path / "dit", max_shard_bytes=SHARD)
    victim = folder / f"diffusion_pytorch_model-00001-of-{len(list(folder.glob('*-of-*'))):05d}.safetensors"
    victim.write_bytes(victim.read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_dit(folder)


def test_strict_mismatch_names_missing_and_unexpected_keys(tmp_path, source):
    sd = dict(source[0].state_dict())
    del sd["blocks.1.ffn.2.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks\.1\.ffn\.2\.bias.*"
                                              r"unexpected keys \(1\): blocks\.0\.extra\.weight"):
        load_dit(path, config=source[0].cfg)
    # Non-strict tolerates the extra key but still refuses to leave a parameter uninitialised.
    with pytest.raises(CheckpointError, match="blocks.1.ffn.2.bias"):
        load_dit(path, config=source[0].cfg, strict=False)
    del sd["blocks.0.extra.weight"]
    sd["blocks.1.ffn.2.bias"] = source[0].state_dict()["blocks.1.ffn.2.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    save_file(sd, str(path))
    assert_same_model(load_dit(path, config=source[0].cfg, strict=False), source)


def test_config_shape_mismatch_is_an_error(tmp_path, source):
    folder = save_dit(source[0], tmp_path / "dit")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_dit(folder, config=source[0].cfg.replace(ffn_dim=64))


def test_missing_weights_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="has no weights"):
        load_dit(tmp_path / "empty")
