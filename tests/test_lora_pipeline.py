"""End to end: ``wanx.load_pipeline`` + ``LoraStack(pipe.experts)`` vs diffusers' WanPipeline with
``load_lora_weights`` on both experts, same tiny checkpoint, same LoRA file, same seed."""

from __future__ import annotations

import pytest
import torch

import wanx
from wanx.lora import LoraStack
from wanx.testing import build_tiny_checkpoint

from helpers_lora import block_linears, comfy_sd, random_truth, rel_err, write
from helpers_pipeline import diffusers_folder_from_official

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPT = "a red circle moving left"
NEGATIVE = "a blue square moving up"
SIZE = (64, 64)  # (W, H)
FRAMES, STEPS, SHIFT, SEED = 5, 4, 3.0, 1234
GUIDE = (3.0, 4.0)  # (low, high)
STRENGTHS = (0.8, 1.4)  # (high-noise expert, low-noise expert)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-e2e")
    official = build_tiny_checkpoint(root / "official", "t2v-A14B", seed=7)
    dif = diffusers_folder_from_official(official, root / "diffusers",
                                         diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT))
    pipe = wanx.load_pipeline(official, device="cpu")
    outside = ["time_projection.1", "head.head", "text_embedding.0", "time_embedding.2"]
    # A LoRA that changes the video a lot (~70%) yet keeps the weights' scale: much larger deltas
    # make the tiny model chaotic and amplify both libraries' fp32 rounding alike.
    truth = random_truth(pipe.experts[0], block_linears(pipe.experts[0].cfg.num_layers) + outside,
                         rank=4, alpha=6.0, seed=31, gain=0.3)
    lora = write(comfy_sd(truth), root / "style_lora.safetensors")
    return official, dif, lora


def _diffusers_video(folder, lora):
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(lora), adapter_name="style")
    pipe.load_lora_weights(str(lora), adapter_name="style", load_into_transformer_2=True)
    pipe.transformer.set_adapters(["style"], [STRENGTHS[0]])
    pipe.transformer_2.set_adapters(["style"], [STRENGTHS[1]])
    out = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=SIZE[1], width=SIZE[0], num_frames=FRAMES,
               num_inference_steps=STEPS, guidance_scale=GUIDE[1], guidance_scale_2=GUIDE[0],
               generator=torch.Generator().manual_seed(SEED), output_type="pt", max_sequence_length=512)
    return out.frames[0].float()  # [F, 3, H, W] in [0, 1]


def _wanx_video(pipe):
    video = pipe.generate(PROMPT, negative_prompt=NEGATIVE, size=SIZE, frame_num=FRAMES, sample_steps=STEPS,
                          sample_shift=SHIFT, guide_scale=GUIDE, sample_solver="euler", seed=SEED)
    return video.tensor.permute(1, 0, 2, 3).add(1).div(2).clamp(0, 1)  # [F, 3, H, W] in [0, 1]


def test_pipeline_with_lora_matches_diffusers(folders):
    official, dif, lora = folders
    pipe = wanx.load_pipeline(dif, device="cpu")
    plain = _wanx_video(pipe)
    stack = LoraStack(pipe.experts)
    report = stack.load(lora, strength=STRENGTHS, expert="both", mode="fuse")
    assert [c.expert for c in report.experts] == ["high", "low"]
    ours = _wanx_video(pipe)
    ref = _diffusers_video(dif, lora)
    err, effect = rel_err(ours, ref), rel_err(ref, plain)
    print(f"t2v-A14B + LoRA on both experts ({STRENGTHS}): video rel err vs diffusers {err:.2e} "
          f"(LoRA changes the video by {effect:.2e})")
    assert ref.std() > 1e-3 and effect > 1e-2
    assert err <= 1e-4
    # Live mode gives the same video; unloading gives back the LoRA-free one exactly.
    stack.unload_all()
    assert torch.equal(_wanx_video(pipe), plain)
    stack.load(lora, strength=STRENGTHS, mode="live")
    live = _wanx_video(pipe)
    print(f"live vs fuse video rel err {rel_err(live, ours):.2e}")
    assert rel_err(live, ours) <= 1e-5
