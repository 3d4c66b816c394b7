"""A whole generation: ``wanx.load_pipeline(...).generate`` vs ``diffusers.WanPipeline`` on the same weights.

The checkpoint folder is written like ``wanx.testing.build_tiny_checkpoint`` (official layout,
``wanx.json`` for the non-standard sizes) but at the bench size. wanx loads it with
``load_pipeline``; the diffusers pipeline is then assembled from the SAME tensors (DiT experts,
umT5 and VAE renamed by wanx's key maps and assigned, not copied), with the folder's tokenizer
and a flow UniPC scheduler configured as the task's official sampler.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from wanx.configs import DiTConfig, VAEConfig, get_task

from .common import Size, interleaved, measure_call_memory, peak_memory, randomize_, summarize

TASK = "t2v-A14B"  # two experts, Wan2.1 VAE: the most common production setup
PROMPT = "a red fox runs across a snowy field at sunrise, cinematic lighting, shallow depth of field"
STEPS = {"tiny": 4, "medium": 2}


def bench_configs(size: Size) -> tuple[DiTConfig, Any, VAEConfig]:
    """The DiT (text_dim = the bench umT5 width), umT5 and a small 2.1 VAE for ``size``."""
    t5 = size.t5
    dit = size.dit.replace(text_dim=t5.dim)
    return dit, t5, VAEConfig.tiny("2.1")


def video_size(size: Size) -> tuple[int, int, int]:
    """(width, height, frames) whose 2.1-VAE latent is ``size.latent``."""
    t, h, w = size.latent
    return w * 8, h * 8, (t - 1) * 4 + 1


def build_checkpoint(size: Size, folder: Path) -> Path:
    """Official-layout folder with random weights at ``size`` (skipped when already written)."""
    from wanx.loading.dit import save_dit
    from wanx.loading.t5 import save_t5
    from wanx.loading.vae import save_vae
    from wanx.model import WanDiT
    from wanx.testing import TINY_TASK_DEFAULTS
    from wanx.text import UMT5Encoder
    from wanx.text.demo_vocab import save_demo_tokenizer
    from wanx.vae import WanVAE

    spec = get_task(TASK)
    stamp = folder / "bench-size.txt"
    if stamp.is_file() and stamp.read_text() == size.name:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    dit_cfg, t5_cfg, vae_cfg = bench_configs(size)
    save_demo_tokenizer(folder / spec.t5_tokenizer, overwrite=True)  # a folder of another size is rewritten
    torch.manual_seed(0)
    t5 = UMT5Encoder(t5_cfg)
    save_t5(t5, folder / spec.t5_checkpoint)
    vae = WanVAE(vae_cfg)
    randomize_(vae, seed=2)
    save_vae(vae, folder / spec.vae_checkpoint)
    for i, sub in enumerate(spec.expert_dirs):
        with torch.device("meta"):
            dit = WanDiT(dit_cfg)
        dit = dit.to_empty(device="cpu")
        randomize_(dit, seed=10 + i)
        save_dit(dit, folder / sub, layout="official")
        del dit
    w, h, frames = video_size(size)
    task = dict(TINY_TASK_DEFAULTS, supported_sizes=[f"{w}*{h}"], default_size=f"{w}*{h}", frame_num=frames,
                sample_steps=STEPS.get(size.name, 2))
    meta = {"t5": t5_cfg.to_dict(), "vae": vae_cfg.to_dict(), "task": {"base": TASK, **task}}
    (folder / "wanx.json").write_text(json.dumps(meta, indent=2) + "\n")
    stamp.write_text(size.name)
    return folder


def load_wanx(folder: Path, device: str):
    import wanx

    return wanx.load_pipeline(folder, device=device, dtype=torch.float32)


def diffusers_from_wanx(pipe, folder: Path):
    """A diffusers WanPipeline holding the wanx pipeline's tensors."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import AutoTokenizer

    from wanx.loading.vae import vae_official_to_diffusers

    from .dit import build_diffusers_sharing
    from .text import build_hf_sharing

    spec = pipe.spec
    vcfg = pipe.vae.cfg
    with torch.device("meta"):
        vae = AutoencoderKLWan(base_dim=vcfg.dim, z_dim=vcfg.z_dim, dim_mult=list(vcfg.dim_mult),
                               num_res_blocks=vcfg.num_res_blocks, attn_scales=list(vcfg.attn_scales),
                               temperal_downsample=list(vcfg.temperal_downsample), dropout=0.0,
                               latents_mean=list(vcfg.mean), latents_std=list(vcfg.std))
    vae.load_state_dict(vae_official_to_diffusers(pipe.vae.state_dict(), "2.1"), strict=True, assign=True)
    experts = [build_diffusers_sharing(m) for m in pipe.experts]
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                    num_train_timesteps=1000, flow_shift=spec.sample_shift, solver_order=2,
                                    solver_type="bh2", lower_order_final=True, final_sigmas_type="zero")
    _use_official_sigmas(sched)
    tok = AutoTokenizer.from_pretrained(folder / spec.t5_tokenizer)
    ref = WanPipeline(tokenizer=tok, text_encoder=build_hf_sharing(pipe.text_encoder.model), vae=vae.eval(),
                      scheduler=sched, transformer=experts[0],
                      transformer_2=experts[1] if len(experts) > 1 else None, boundary_ratio=spec.boundary)
    ref.set_progress_bar_config(disable=True)
    return ref


def _use_official_sigmas(scheduler) -> None:
    """diffusers' flow UniPC spans linspace(1, 1/1000); the official spans linspace(0.999, 0).

    Feeding the official unshifted list makes both pipelines run the same recipe, so the
    whole-generation row compares speed on identical work (and its video diff is meaningful).
    """
    import numpy as np

    original = scheduler.set_timesteps

    def set_timesteps(num_inference_steps=None, device=None, **kw):
        sigmas = np.linspace(np.float32(0.999), 0, num_inference_steps + 1)[:-1]
        return original(sigmas=sigmas, device=device)

    scheduler.set_timesteps = set_timesteps


def calls(pipe, ref, size: Size):
    spec = pipe.spec
    w, h, frames = video_size(size)
    steps = STEPS.get(size.name, 2)
    low, high = spec.guide_scale if isinstance(spec.guide_scale, tuple) else (spec.guide_scale,) * 2

    def ours():
        return pipe.generate(PROMPT, size=(w, h), frame_num=frames, sample_steps=steps, seed=42).tensor

    def theirs():
        out = ref(prompt=PROMPT, negative_prompt=spec.negative_prompt, height=h, width=w, num_frames=frames,
                  num_inference_steps=steps, guidance_scale=high, guidance_scale_2=low,
                  generator=torch.Generator().manual_seed(42), output_type="pt").frames
        return out[0].permute(1, 0, 2, 3) * 2 - 1  # [F, 3, H, W] in [0, 1] -> [3, F, H, W] in [-1, 1]
    return ours, theirs


def run(size: Size, repeats: int, device: str, mem: bool, workdir: Path) -> list[dict[str, Any]]:
    folder = build_checkpoint(size, workdir / f"ckpt-{size.name}")
    pipe = load_wanx(folder, device)
    ref = diffusers_from_wanx(pipe, folder)
    ours, theirs = calls(pipe, ref, size)
    a, b = ours(), theirs()
    diff = (a.float() - b.float().to(a.device)).abs().max().item() if a.shape == b.shape else float("nan")
    times = interleaved({"wanx": ours, "ref": theirs}, repeats=repeats, warmup=0, device=device)
    w, h, frames = video_size(size)
    row = {"size": size.name, "what": f"whole generation ({w}x{h}x{frames}, {STEPS.get(size.name, 2)} steps, CFG)",
           "ref_impl": "diffusers WanPipeline", "max_abs_video_diff": diff, **summarize(times)}
    del pipe, ref
    if mem:
        row["memory"] = {impl: peak_memory("pipeline", impl, size.name, ["--workdir", str(workdir)])
                         for impl in ("wanx", "ref")}
    return [row]


def mem_child(size: Size, impl: str, device: str, workdir: Path) -> dict[str, Any]:
    folder = build_checkpoint(size, workdir / f"ckpt-{size.name}")
    pipe = load_wanx(folder, device)
    ours, theirs = calls(pipe, diffusers_from_wanx(pipe, folder) if impl == "ref" else None, size)
    return measure_call_memory(ours if impl == "wanx" else theirs, device)
