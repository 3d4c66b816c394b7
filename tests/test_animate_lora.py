"""Relighting LoRA: fused into wanx's Animate DiT == the official PEFT adapter on the official model."""

from __future__ import annotations

import pytest
import torch

from helpers_animate import official_module, official_twin, rel_err, tiny_inputs
from wanx.configs import AnimateConfig
from wanx.loading.animate_lora import fuse_relighting_lora, relighting_targets
from wanx.loading.safe import CheckpointError
from wanx.model.animate import WanAnimateDiT
from wanx.model.attention import attention_backend

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def test_fused_relighting_lora_matches_the_official_peft_adapter(monkeypatch, tmp_path):
    peft = pytest.importorskip("peft")
    cfg = AnimateConfig.tiny()
    ref = official_twin(cfg, monkeypatch)
    ours = WanAnimateDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    utils = official_module("modules.animate.animate_utils")
    ref.add_adapter(utils.get_loraconfig(transformer=ref, rank=4, alpha=128))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_" in name:  # the gaussian init leaves B at zero: give both factors weight
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    sd = peft.get_peft_model_state_dict(ref)
    torch.save({"state_dict": sd}, tmp_path / "relighting_lora.ckpt")
    peft.set_peft_model_state_dict(ref, torch.load(tmp_path / "relighting_lora.ckpt")["state_dict"])
    changed = fuse_relighting_lora(ours, tmp_path / "relighting_lora.ckpt")
    assert changed == len(relighting_targets(ours)) == cfg.num_layers * 12  # q k v o x2, k_img v_img, ffn x2
    x, t, ctx, clip, y, pose, face = tiny_inputs(cfg)
    with torch.no_grad(), attention_backend("math"):
        out = ours(x, t, ctx, clip_fea=clip, y=y, pose_latents=pose, face_pixels=face)
        expected = ref([x[0]], t=t, clip_fea=clip, context=[ctx[0]], seq_len=x[0, 0].numel() // 4, y=[y[0]],
                       pose_latents=pose, face_pixel_values=face)[0]
        ref.disable_adapters()
        base = ref([x[0]], t=t, clip_fea=clip, context=[ctx[0]], seq_len=x[0, 0].numel() // 4, y=[y[0]],
                   pose_latents=pose, face_pixel_values=face)[0]
    err = rel_err(out[0], expected)
    print(f"relighting LoRA (fused) vs official PEFT adapter: max rel err = {err:.2e}")
    assert err <= 1e-5 and rel_err(base, expected) > 1e-3  # the LoRA really changes the output


def test_a_lora_for_an_unknown_module_is_refused(tmp_path):
    model = WanAnimateDiT(AnimateConfig.tiny())
    sd = {"blocks.0.face_adapter.linear2.lora_A.weight": torch.zeros(4, 64),
          "blocks.0.face_adapter.linear2.lora_B.weight": torch.zeros(64, 4)}
    torch.save({"state_dict": sd}, tmp_path / "l.ckpt")
    with pytest.raises(CheckpointError, match="face_adapter"):
        fuse_relighting_lora(model, tmp_path / "l.ckpt")
    torch.save({"state_dict": {"blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 64)}}, tmp_path / "l.ckpt")
    with pytest.raises(CheckpointError, match="without both"):
        fuse_relighting_lora(model, tmp_path / "l.ckpt")
