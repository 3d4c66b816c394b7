"""LoRA coverage reports and refusals: every bad file gives its message and leaves the experts
bit-identical; keys for modules Wan 2.2 lacks are dropped with a warning naming them."""

from __future__ import annotations

import logging

import pytest
import torch

from wanx.lora import LoraError, LoraStack, parse_lora_arg
from wanx.lora import stack as stack_module

from helpers_lora import (assert_bit_identical, block_linears, comfy_sd, kohya_sd, make_experts, random_truth,
                          rich_lora, snapshot, tiny_cfg, write)


def refused(experts, path, match, **kw):
    """``load`` raises LoraError matching ``match`` and changes no weight of any expert."""
    snap = snapshot(*experts)
    stack = LoraStack(experts)
    with pytest.raises(LoraError, match=match) as info:
        stack.load(path, **kw)
    print(f"{path.name}: {info.value}")
    assert_bit_identical(experts, snap)
    assert stack.applied == ()
    return info.value


# ------------------------------------------------------------------------------------ coverage

def test_report_counts_and_drops_wan21_image_keys(tmp_path, caplog):
    experts = make_experts()
    truth = random_truth(experts[0], block_linears(2), alpha=6.0)
    sd = comfy_sd(truth)
    g = torch.Generator().manual_seed(0)
    # A Wan 2.1 I2V LoRA also adapts the CLIP image branch, in every spelling.
    extra = {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.randn(4, 64, generator=g),
             "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.randn(64, 4, generator=g),
             "diffusion_model.blocks.1.cross_attn.norm_k_img.diff": torch.randn(64, generator=g),
             "diffusion_model.img_emb.proj.1.lora_down.weight": torch.randn(4, 1280, generator=g),
             "diffusion_model.img_emb.proj.1.lora_up.weight": torch.randn(64, 4, generator=g)}
    path = write({**sd, **extra}, tmp_path / "wan21_i2v.safetensors")
    caplog.set_level(logging.WARNING, logger="wanx.lora")
    report = LoraStack(experts).load(path, strength=1.0)
    print(report.summary())
    assert [c.expert for c in report.experts] == ["high", "low"]
    for c in report.experts:
        assert c.modules == 20 and c.params_fused == 20 and c.layers_live == 0
        assert c.by_kind == {"self_attn": 8, "cross_attn": 8, "ffn": 4}
    assert sorted(report.dropped) == sorted(extra)
    assert report.ranks == {4: 20} and report.unknown == {}
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "dropped 5 keys" in warning and "cross_attn.k_img" in warning and "img_emb.proj.1" in warning


def test_dropped_in_kohya_and_diffusers_spelling(tmp_path):
    (model,) = make_experts()[:1]
    truth = random_truth(model, ["blocks.0.self_attn.q"], alpha=2.0)
    sd = kohya_sd(truth)
    sd["lora_unet_blocks_1_cross_attn_v_img.lora_down.weight"] = torch.zeros(4, 64)
    sd["lora_unet_blocks_1_cross_attn_v_img.lora_up.weight"] = torch.zeros(64, 4)
    report = LoraStack((model,)).load(write(sd, tmp_path / "k.safetensors"))
    assert len(report.dropped) == 2 and report.experts[0].modules == 1
    diff = {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 64),
            "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, 4),
            "transformer.blocks.0.attn2.add_k_proj.lora_A.weight": torch.randn(4, 64),
            "transformer.blocks.0.attn2.add_k_proj.lora_B.weight": torch.randn(64, 4)}
    report = LoraStack((model,)).load(write(diff, tmp_path / "d.safetensors"))
    assert report.dropped == ["transformer.blocks.0.attn2.add_k_proj.lora_A.weight",
                              "transformer.blocks.0.attn2.add_k_proj.lora_B.weight"]


def test_unknown_keys_strict_and_lenient(tmp_path):
    experts = make_experts()
    truth = random_truth(experts[0], block_linears(2))
    sd = comfy_sd(truth)
    sd["diffusion_model.blocks.0.self_attn.q.dora_scale"] = torch.ones(64, 1)
    sd["diffusion_model.blocks.0.mystery.lora_down.weight"] = torch.ones(4, 64)
    path = write(sd, tmp_path / "odd.safetensors")
    err = refused(experts, path, "2 keys are not understood")
    assert "dora_scale" in str(err) and "mystery" in str(err) and "strict=False" in str(err)
    report = LoraStack(experts).load(path, strict=False)
    assert set(report.unknown) == {"diffusion_model.blocks.0.self_attn.q.dora_scale",
                                   "diffusion_model.blocks.0.mystery.lora_down.weight"}
    assert report.experts[0].modules == 20


# ------------------------------------------------------------------------------------ refusals

def test_other_architecture(tmp_path):
    experts = make_experts()
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
            "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 768)}
    refused(experts, write(sdxl, tmp_path / "sdxl.safetensors"), "not a LoRA for a Wan diffusion transformer")
    flux = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}
    refused(experts, write(flux, tmp_path / "flux.safetensors"), "another architecture")
    only_i2v = {"diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(4, 64),
                "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(64, 4)}
    refused(experts, write(only_i2v, tmp_path / "i2v.safetensors"), "none of its modules exist")


def test_wrong_model_size(tmp_path):
    experts = make_experts()
    big = make_experts(tiny_cfg(dim=128, num_heads=2, ffn_dim=256))[0]
    _, path = rich_lora(big, tmp_path)
    err = refused(experts, path, "does not fit")
    assert "dim 64" in str(err)
    deep = make_experts(tiny_cfg(num_layers=4))[0]
    truth = random_truth(deep, block_linears(4))
    refused(experts, write(comfy_sd(truth), tmp_path / "deep.safetensors"), "blocks this 2-block model")


def test_only_the_low_expert_does_not_fit(tmp_path):
    """The second expert's mismatch is found before the first expert changes."""
    high = make_experts()[0]
    low = make_experts(tiny_cfg(ffn_dim=96))[1]
    _, path = rich_lora(high, tmp_path)
    refused((high, low), path, "ffn")


def test_rank_mismatch_and_incomplete_pairs(tmp_path):
    experts = make_experts()
    truth = random_truth(experts[0], block_linears(2))
    sd = comfy_sd(truth)
    sd["diffusion_model.blocks.1.ffn.2.lora_up.weight"] = torch.zeros(64, 3)
    refused(experts, write(sd, tmp_path / "rank.safetensors"), "rank mismatch .* blocks.1.ffn.2")
    sd = comfy_sd(truth)
    del sd["diffusion_model.blocks.0.self_attn.k.lora_up.weight"]
    refused(experts, write(sd, tmp_path / "half.safetensors"), "incomplete LoRA pair for blocks.0.self_attn.k")


def test_truncated_and_missing_files(tmp_path):
    experts = make_experts()
    _, path = rich_lora(experts[0], tmp_path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(experts, cut, "corrupt or truncated")
    refused(experts, tmp_path / "nope.safetensors", "not found")


class NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    experts = make_experts()
    truth = random_truth(experts[0], ["blocks.0.self_attn.q"])
    sd = comfy_sd(truth)
    path = tmp_path / "evil.pt"
    torch.save({**sd, "payload": NotATensor()}, path)
    refused(experts, path, "not a plain tensor checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)  # the same tensors without the object load through the safe reader
    report = LoraStack(experts).load(plain)
    assert report.experts[0].modules == 1


def test_failure_while_applying_undoes_that_load(tmp_path, monkeypatch):
    experts = make_experts()
    _, first = rich_lora(experts[0], tmp_path, "first.safetensors", seed=5)
    _, second = rich_lora(experts[0], tmp_path, "second.safetensors", seed=6)
    stack = LoraStack(experts)
    stack.load(first, strength=0.5)
    snap = snapshot(*experts)
    calls = {"n": 0}
    real = stack_module.LoraStack._fuse_param

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] == 30:  # partway through the low expert
            raise MemoryError("simulated out-of-memory")
        return real(self, *args)
    monkeypatch.setattr(stack_module.LoraStack, "_fuse_param", flaky)
    with pytest.raises(MemoryError):
        stack.load(second, strength=2.0)
    assert_bit_identical(experts, snap)  # the first LoRA is still fused, the second left no trace
    assert [r.name for r in stack.applied] == ["first.safetensors"]
    monkeypatch.undo()
    stack.unload_all()
    assert_bit_identical(experts, snapshot(*make_experts()))


# ------------------------------------------------------------------------------------ CLI value

@pytest.mark.parametrize("value,expected", [
    ("style.safetensors", ("style.safetensors", 1.0, "both")),
    ("style.safetensors:0.8", ("style.safetensors", 0.8, "both")),
    ("style.safetensors@high", ("style.safetensors", 1.0, "high")),
    ("style.safetensors:-1.5@LOW", ("style.safetensors", -1.5, "low")),
    ("C:\\loras\\x.safetensors", ("C:\\loras\\x.safetensors", 1.0, "both")),
    ("C:\\loras\\x.safetensors:2@low", ("C:\\loras\\x.safetensors", 2.0, "low")),
    ("/data/run:3/x.safetensors:0.5", ("/data/run:3/x.safetensors", 0.5, "both")),
    ("/data/run:3/x.safetensors", ("/data/run:3/x.safetensors", 1.0, "both")),
])
def test_parse_lora_arg(value, expected):
    assert parse_lora_arg(value, exists=lambda p: False) == expected


def test_parse_lora_arg_existing_files(tmp_path):
    odd = tmp_path / "weird:2"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)) == (str(odd), 1.0, "both")  # a real file named like a strength
    (tmp_path / "weird").write_bytes(b"")
    with pytest.raises(LoraError, match="ambiguous"):
        parse_lora_arg(str(odd))
    for bad in (":0.5", "@high", ""):
        with pytest.raises(LoraError, match="no file name|needs a file"):
            parse_lora_arg(bad)
