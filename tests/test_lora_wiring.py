"""LoRAs through the pipeline and the CLI: load/unload on a loaded pipeline, the recipe records each
file, --lora is checked before loading, and live LoRAs stay out of a real-guidance phase."""

from __future__ import annotations

import pytest
import torch

import wanx
from wanx import cli
from wanx.media import read_mp4
from wanx.testing import build_tiny_checkpoint

from helpers_lora import block_linears, comfy_sd, random_truth, write


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("lw") / "t2v", "t2v-A14B", seed=6)


@pytest.fixture(scope="module")
def pipe(folder):
    return wanx.load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def lora_file(pipe, tmp_path_factory):
    model = pipe.experts[0]
    truth = random_truth(model, block_linears(model.cfg.num_layers), gain=1.0)
    return write(comfy_sd(truth), tmp_path_factory.mktemp("lf") / "style_lora.safetensors")


def _gen(pipe, **kw):
    return pipe.generate("a red circle moving left", size=(64, 64), frame_num=5, sample_steps=3, seed=2, **kw).tensor


def test_pipeline_load_unload_and_recipe(pipe, lora_file):
    plain = _gen(pipe)
    report = pipe.load_lora(lora_file, strength=0.7, expert="low")
    assert "low" in report.summary() and len(pipe.loras) == 1
    video = pipe.generate("a red circle moving left", size=(64, 64), frame_num=5, sample_steps=3, seed=2)
    assert not torch.equal(video.tensor, plain)
    entry = video.metadata["loras"][0]
    assert entry["name"] == "style_lora.safetensors" and entry["expert"] == "low" and entry["strength"] == 0.7
    assert len(entry["sha256"]) == 64 and entry["mode"] == "fuse"
    pipe.unload_loras()
    assert torch.equal(_gen(pipe), plain) and pipe.loras == ()


def test_live_loras_are_left_out_of_the_real_guidance_phase(pipe, lora_file):
    plain = _gen(pipe, guide_scale=3.0)
    pipe.load_lora(lora_file, mode="live")
    try:
        with_lora = _gen(pipe, guide_scale=3.0)
        phased = _gen(pipe, guide_scale=1.0, cfg_first_steps=3, cfg_first_scale=3.0)  # every step in the phase
        after = _gen(pipe, guide_scale=3.0)
    finally:
        pipe.unload_loras()
    assert torch.equal(phased, plain)  # LoRA off in the phase: exactly the plain model
    assert torch.equal(after, with_lora) and not torch.equal(with_lora, plain)  # and back on after it


def test_cli_lora_is_applied_and_recorded(folder, lora_file, tmp_path):
    out = tmp_path / "v.mp4"
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folder), "--size", "64*64", "--frame_num", "5",
                   "--sample_steps", "2", "--base_seed", "1", "--save_file", str(out),
                   "--lora", f"{lora_file}:0.5@high", "--lora_mode", "live"])
    assert rc == 0
    _, _, recipe = read_mp4(out)
    assert recipe["loras"][0]["strength"] == 0.5 and recipe["loras"][0]["expert"] == "high"
    assert recipe["loras"][0]["mode"] == "live"


def test_cli_refuses_a_lora_that_does_not_fit_before_loading(folder, tmp_path, monkeypatch, capsys):
    def boom(*a, **k):
        raise AssertionError("loaded before checking --lora")
    monkeypatch.setattr(wanx, "load_pipeline", boom)
    bad = write({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                 "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
                tmp_path / "sdxl.safetensors")
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folder), "--lora", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "sdxl.safetensors" in err and err.startswith("wanx: error:")
    rc = cli.main(["generate", "x", "--ckpt_dir", str(folder), "--lora", str(tmp_path / "none.safetensors")])
    assert rc == 2 and "not found" in capsys.readouterr().err
