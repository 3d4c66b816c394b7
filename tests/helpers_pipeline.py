"""Test helpers: the same tiny random weights as an official folder and as a diffusers folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from wanx.configs import VAEConfig
from wanx.loading.dit import load_dit, save_dit
from wanx.loading.layout import find_checkpoint
from wanx.loading.t5 import load_t5, save_t5_hf
from wanx.loading.vae import load_vae, vae_official_to_diffusers


def diffusers_vae_kwargs(cfg: VAEConfig) -> dict:
    """AutoencoderKLWan constructor arguments for a wanx VAEConfig."""
    kw = dict(base_dim=cfg.dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
              num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
              temperal_downsample=list(cfg.temperal_downsample), dropout=cfg.dropout,
              latents_mean=list(cfg.mean), latents_std=list(cfg.std))
    if cfg.version == "2.2":
        kw.update(decoder_base_dim=cfg.decoder_dim, is_residual=True, in_channels=12, out_channels=12,
                  patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4)
    return kw


def diffusers_folder_from_official(official: Path, dst: Path, scheduler, image_pipeline: bool = False) -> Path:
    """Write ``official``'s weights as a diffusers pipeline folder (save_pretrained of real diffusers objects).

    ``image_pipeline`` saves a WanImageToVideoPipeline (TI2V's image mode) instead of WanPipeline.
    """
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    layout = find_checkpoint(official)
    spec = layout.spec
    work = dst.parent / (dst.name + "-parts")
    transformers_ = []
    for i, path in enumerate(layout.dit_paths):
        save_dit(load_dit(path), work / f"transformer{i}", layout="diffusers")
        transformers_.append(WanTransformer3DModel.from_pretrained(work / f"transformer{i}"))
    vae_w = load_vae(layout.vae_path, config=layout.vae_config)
    vae = AutoencoderKLWan(**diffusers_vae_kwargs(vae_w.cfg))
    vae.load_state_dict(vae_official_to_diffusers(vae_w.state_dict(), vae_w.cfg.version), strict=True)
    save_t5_hf(load_t5(layout.t5_path, config=layout.t5_config), work / "text_encoder")
    text_encoder = UMT5EncoderModel.from_pretrained(work / "text_encoder")
    tokenizer = AutoTokenizer.from_pretrained(layout.tokenizer_dir)
    parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                 transformer=transformers_[0],
                 transformer_2=transformers_[1] if len(transformers_) > 1 else None)
    if spec.is_moe:
        parts["boundary_ratio"] = spec.boundary
    else:
        parts["expand_timesteps"] = True
    cls = WanImageToVideoPipeline if spec.dit.model_type == "i2v" or image_pipeline else WanPipeline
    if cls is WanImageToVideoPipeline:
        parts.update(image_encoder=None, image_processor=None)
    cls(**parts).save_pretrained(dst)
    shutil.rmtree(work)
    return dst


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()
