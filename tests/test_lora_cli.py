"""``wanx lora inspect`` and ``wanx convert lora``: what they print, what they refuse, and that a
converted file applies exactly like its source (and is read by diffusers where the format allows)."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

from wanx.lora import LoraError, LoraStack
from wanx.lora.cli import CONVERT_TARGETS, add_lora_inspect_parser, cmd_convert_lora, cmd_lora_inspect
from wanx.testing import build_tiny_checkpoint

from helpers_lora import (block_linears, comfy_sd, diffusers_load, diffusers_model, kohya_sd, make_experts,
                          make_inputs, random_truth, rel_err, rich_lora, run_diffusers, run_wanx, tiny_cfg,
                          wanx_from_diffusers, write)


def inspect(path, ckpt_dir=None) -> int:
    parser = argparse.ArgumentParser(prog="wanx")
    lora = parser.add_subparsers(dest="command").add_parser("lora").add_subparsers(dest="lora_command")
    add_lora_inspect_parser(lora)
    args = parser.parse_args(["lora", "inspect", str(path)] + (["--ckpt_dir", str(ckpt_dir)] if ckpt_dir else []))
    assert args.lora_handler is cmd_lora_inspect
    return args.lora_handler(args)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "t2v", "t2v-A14B", seed=3)


def test_inspect_describes_and_fits(tmp_path, tiny_folder, capsys):
    model = make_experts()[0]
    truth = random_truth(model, block_linears(2), rank=8, alpha=4.0)
    path = write(kohya_sd(truth), tmp_path / "wan22_style_HIGH_noise.safetensors")
    assert inspect(path, tiny_folder) == 0
    out = capsys.readouterr().out
    print(out)
    assert "format:   kohya" in out and "ranks:    8 x20" in out and "alpha:    4 x20" in out
    assert "cross_attn 8, ffn 4, self_attn 8" in out and "blocks:   0-1 (2 blocks" in out
    assert "the high-noise expert" in out
    assert "fits high (high_noise_model): yes (20 entries)" in out
    assert "fits low (low_noise_model): yes (20 entries)" in out


def test_inspect_reports_a_misfit(tmp_path, tiny_folder, capsys):
    big = make_experts(tiny_cfg(dim=128, num_heads=2))[0]
    _, path = rich_lora(big, tmp_path, "big_low_noise_model.safetensors")
    assert inspect(path, tiny_folder) == 1
    out = capsys.readouterr().out
    print(out)
    assert "format:   lightx2v" in out and "deltas:   6 whole-tensor deltas" in out
    assert "the low-noise expert" in out
    assert "fits high (high_noise_model): NO - LoRA big_low_noise_model.safetensors does not fit" in out


def test_inspect_other_architecture(tmp_path, capsys):
    path = write({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
                  "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)},
                 tmp_path / "sdxl.safetensors")
    assert inspect(path) == 1
    assert "another architecture" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ convert

@pytest.mark.parametrize("to", CONVERT_TARGETS)
def test_convert_applies_like_the_source(tmp_path, to):
    model = make_experts()[0]
    truth = random_truth(model, block_linears(2) + ["head.head", "patch_embedding"], rank=4, alpha=6.0)
    src = write(kohya_sd(truth) if to != "comfy" else comfy_sd(truth, ""), tmp_path / "src.safetensors")
    dst = tmp_path / f"out_{to}.safetensors"
    assert cmd_convert_lora(src, dst, to) == 0
    inputs = make_inputs(model.cfg)
    outs = []
    for path in (src, dst):
        m = copy.deepcopy(model)
        LoraStack((m,)).load(path)
        outs.append(run_wanx(m, inputs))
    err = rel_err(outs[1], outs[0])
    print(f"kohya/official -> {to}: rel err {err:.2e}")
    assert err <= 1e-6 and rel_err(outs[0], run_wanx(model, inputs)) > 1e-2


def test_converted_diffusers_file_is_read_by_diffusers(tmp_path):
    pytest.importorskip("peft")
    cfg = tiny_cfg()
    ref = diffusers_model(cfg)
    ours = wanx_from_diffusers(ref, cfg)
    truth = random_truth(ours, block_linears(2) + ["time_projection.1"], rank=4, alpha=6.0)
    truth.pairs["blocks.1.ffn.0"] = random_truth(ours, ["blocks.1.ffn.0"], rank=2, alpha=1.0).pairs["blocks.1.ffn.0"]
    sd = comfy_sd(truth)
    sd["diffusion_model.blocks.0.self_attn.q.diff_b"] = torch.randn(64) * 0.1
    src = write(sd, tmp_path / "src.safetensors")
    dst = tmp_path / "dif.safetensors"
    cmd_convert_lora(src, dst, "diffusers")
    inputs = make_inputs(cfg)
    LoraStack((ours,)).load(src, strength=0.7)
    got = run_wanx(ours, inputs)
    want = run_diffusers(diffusers_load(copy.deepcopy(ref), [(dst, 0.7)]), inputs)
    err = rel_err(got, want)
    print(f"converted to diffusers, read by diffusers: rel err {err:.2e}")
    assert err <= 1e-5


def test_convert_refusals(tmp_path):
    model = make_experts()[0]
    _, rich = rich_lora(model, tmp_path)
    with pytest.raises(LoraError, match="same file"):
        cmd_convert_lora(rich, tmp_path / "." / "rich.safetensors", "comfy", overwrite=True)
    existing = write({"x": torch.zeros(1)}, tmp_path / "taken.safetensors")
    with pytest.raises(LoraError, match="already exists; pass --overwrite"):
        cmd_convert_lora(rich, existing, "comfy")
    assert cmd_convert_lora(rich, existing, "comfy", overwrite=True) == 0
    with pytest.raises(LoraError, match="cannot hold .* whole-tensor deltas .*--to comfy"):
        cmd_convert_lora(rich, tmp_path / "d.safetensors", "diffusers")
    assert not (tmp_path / "d.safetensors").exists()
    with pytest.raises(LoraError, match="--to must be one of"):
        cmd_convert_lora(rich, tmp_path / "e.safetensors", "kohya")
    with pytest.raises(LoraError, match=r"\.safetensors"):
        cmd_convert_lora(rich, tmp_path / "e.pt", "comfy")
    odd = write({**comfy_sd(random_truth(model, ["blocks.0.ffn.0"])), "foo.bar": torch.zeros(1)},
                tmp_path / "odd.safetensors")
    with pytest.raises(LoraError, match="not understood and would be lost: foo.bar"):
        cmd_convert_lora(odd, tmp_path / "f.safetensors", "comfy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.safetensors", "rich.safetensors", "taken.safetensors"]
