"""`wanx convert`: any supported input rewritten with official key names, same numbers."""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from wanx import cli
from wanx.configs import DiTConfig, T5Config, VAEConfig
from wanx.loading.dit import load_dit, save_dit
from wanx.loading.t5 import load_t5, save_t5_hf
from wanx.loading.vae import load_vae, save_vae
from wanx.model import WanDiT
from wanx.text import UMT5Encoder
from wanx.vae import WanVAE


def test_convert_dit_single_file_to_official_folder(tmp_path):
    torch.manual_seed(0)
    model = WanDiT(DiTConfig.tiny("t2v"))
    save_dit(model, tmp_path / "comfy.safetensors", layout="single_file", prefix="model.diffusion_model.")
    # A single file carries no head count; real models have 128-wide heads, tiny ones do not.
    assert cli.main(["convert", "dit", str(tmp_path / "comfy.safetensors"), str(tmp_path / "out"),
                     "--num_heads", "2"]) == 0
    back = load_dit(tmp_path / "out")
    assert set(back.state_dict()) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_convert_vae_pth_to_official_safetensors(tmp_path):
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig.tiny("2.1"))
    save_vae(vae, tmp_path / "Wan2.1_VAE.pth")
    assert cli.main(["convert", "vae", str(tmp_path / "Wan2.1_VAE.pth"), str(tmp_path / "vae.safetensors")]) == 0
    sd = load_file(str(tmp_path / "vae.safetensors"))
    assert set(sd) == set(vae.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in vae.state_dict().items())
    assert load_vae(tmp_path / "vae.safetensors").cfg.version == "2.1"


def test_convert_t5_hf_folder_to_official(tmp_path):
    torch.manual_seed(0)
    t5 = UMT5Encoder(T5Config.tiny())
    save_t5_hf(t5, tmp_path / "text_encoder")
    assert cli.main(["convert", "t5", str(tmp_path / "text_encoder"), str(tmp_path / "t5.safetensors")]) == 0
    sd = load_file(str(tmp_path / "t5.safetensors"))
    assert set(sd) == set(t5.state_dict())
    assert torch.equal(load_t5(tmp_path / "t5.safetensors").state_dict()["norm.weight"], t5.norm.weight)


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "exists.safetensors"
    target.write_bytes(b"keep")
    assert cli.main(["convert", "vae", str(tmp_path / "missing.pth"), str(target)]) == 2
    assert target.read_bytes() == b"keep"
