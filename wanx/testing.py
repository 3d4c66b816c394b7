"""Tiny random-weight checkpoints in the official layout, for tests, smoke runs and benchmarks.

`build_tiny_checkpoint(folder, task)` writes exactly the files a real Wan 2.2 folder has (umT5
`.pth`, tokenizer folder, VAE `.pth`, expert subfolders with config.json + safetensors) at toy
sizes, plus the `wanx.json` that tells wanx the non-standard component sizes.

    python -m wanx.testing outputs/tiny-t2v --task t2v-A14B
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .atomic import atomic_output
from .configs import (S2V_WAV2VEC_DIR, AnimateConfig, CLIPVisionConfig, DiTConfig, S2VConfig, T5Config, VAEConfig,
                      get_task)

# One head: the CLIP loader infers heads as width // 80 (ViT-H/14), at least 1; it runs the first 2 of 3 blocks.
TINY_CLIP = CLIPVisionConfig.tiny(num_heads=1, num_layers=3, use_layers=2)
# Animate: 9-frame segments (3 latent frames with the reference); the size comes from the pose video.
TINY_ANIMATE_DEFAULTS = {"frame_num": 9, "sample_steps": 3}
TINY_TASK_DEFAULTS = {"supported_sizes": ["64*64", "128*64", "64*128", "128*128"],
                      "default_size": "64*64", "frame_num": 5, "sample_steps": 4}
# S2V's speech encoder: the released wav2vec2's shape (24 layers -> 25 hidden states), 32 wide.
TINY_WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=24, num_attention_heads=4, intermediate_size=64,
                     conv_dim=(16,) * 7, conv_bias=True, num_conv_pos_embeddings=16,
                     num_conv_pos_embedding_groups=4, feat_extract_norm="layer", do_stable_layer_norm=True)


def _randomize(module: torch.nn.Module, generator: torch.Generator, std: float = 0.05) -> None:
    """Fill every parameter with small noise (zero-initialised heads would make outputs trivial)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("gamma", "norm_q.weight", "norm_k.weight", "norm1.weight", "norm2.weight",
                              "norm3.weight", "norm.weight")):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(std * torch.randn(p.shape, generator=generator))


def tiny_configs(task: str) -> tuple[DiTConfig, T5Config, VAEConfig]:
    """The tiny DiT/T5/VAE configs used for ``task`` (same channel layout as the real model)."""
    spec = get_task(task)
    t5 = T5Config.tiny()
    if isinstance(spec.dit, AnimateConfig):  # CLIP features: TINY_CLIP's width and token count
        dit = AnimateConfig.tiny(text_dim=t5.dim, image_dim=TINY_CLIP.dim, image_tokens=TINY_CLIP.num_tokens)
    elif isinstance(spec.dit, S2VConfig):  # audio features: TINY_WAV2VEC2's width
        dit = S2VConfig.tiny(text_dim=t5.dim, audio_dim=TINY_WAV2VEC2["hidden_size"])
    else:
        dit = DiTConfig.tiny(spec.dit.model_type, text_dim=t5.dim)
    vae = VAEConfig.tiny(spec.vae_version)
    return dit, t5, vae


def build_tiny_checkpoint(folder: str | Path, task: str = "t2v-A14B", *, seed: int = 0,
                          max_shard_bytes: int | None = None, task_overrides: dict | None = None) -> Path:
    """Write a complete official-layout checkpoint with random weights; returns the folder."""
    from .loading.dit import save_dit
    from .loading.t5 import save_t5
    from .loading.vae import save_vae
    from .model import WanDiT
    from .text import UMT5Encoder
    from .text.demo_vocab import save_demo_tokenizer
    from .vae import WanVAE

    spec = get_task(task)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    dit_cfg, t5_cfg, vae_cfg = tiny_configs(task)

    save_demo_tokenizer(folder / spec.t5_tokenizer, overwrite=True)  # rebuilding a folder in place is allowed
    t5 = UMT5Encoder(t5_cfg)
    _randomize(t5, gen, std=0.5)
    save_t5(t5, folder / spec.t5_checkpoint)
    vae = WanVAE(vae_cfg)
    _randomize(vae, gen)
    save_vae(vae, folder / spec.vae_checkpoint)
    if isinstance(dit_cfg, AnimateConfig):
        _write_tiny_animate(folder, dit_cfg, gen)
        overrides = dict(TINY_ANIMATE_DEFAULTS, **(task_overrides or {}))
    elif isinstance(dit_cfg, S2VConfig):
        _write_tiny_s2v(folder, dit_cfg, gen, max_shard_bytes)
        overrides = dict(TINY_TASK_DEFAULTS, **(task_overrides or {}))
    else:
        for sub in (spec.expert_dirs or (".",)):
            dit = WanDiT(dit_cfg)
            _randomize(dit, gen)
            save_dit(dit, folder / sub, layout="official", max_shard_bytes=max_shard_bytes)
        overrides = dict(TINY_TASK_DEFAULTS, **(task_overrides or {}))
    meta = {"t5": t5_cfg.to_dict(), "vae": vae_cfg.to_dict(), "task": {"base": task, **overrides}}
    with atomic_output(folder / "wanx.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def _write_tiny_animate(folder: Path, cfg: AnimateConfig, gen: torch.Generator) -> None:
    """Animate's DiT (official keys, config.json) and a CLIP file shaped like the official one (visual. keys)."""
    from .loading.animate import save_animate_dit
    from .loading.animate_clip import CLIP_CHECKPOINT
    from .model.animate import WanAnimateDiT
    from .vision import CLIPVision

    dit = WanAnimateDiT(cfg)
    _randomize(dit, gen)
    with torch.no_grad():  # LIA weights are used at N(0, 1) scale (they are rescaled at run time)
        for name, p in dit.motion_encoder.named_parameters():
            if "bias" not in name:
                p.normal_(generator=gen)
    save_animate_dit(dit, folder)
    clip = CLIPVision(TINY_CLIP.replace(use_layers=TINY_CLIP.num_layers))  # all blocks, as the file has
    _randomize(clip, gen)
    sd = {f"visual.{k}": v for k, v in clip.state_dict().items()}
    width = TINY_CLIP.dim
    sd.update({"visual.post_norm.weight": torch.ones(width), "visual.post_norm.bias": torch.zeros(width),
               "visual.head": torch.randn(width, width, generator=gen), "log_scale": torch.tensor(2.0)})
    with atomic_output(folder / CLIP_CHECKPOINT, overwrite=True) as tmp:
        torch.save(sd, tmp)


def _write_tiny_s2v(folder: Path, cfg: S2VConfig, gen: torch.Generator, max_shard_bytes: int | None) -> None:
    """The S2V transformer at the root and the wav2vec2 folder next to it, random weights."""
    from .audio.wav2vec2 import Wav2Vec2, Wav2Vec2Config
    from .loading.s2v import save_s2v
    from .loading.s2v_wav2vec2 import save_wav2vec2
    from .model.s2v import WanS2VDiT

    model = WanS2VDiT(cfg)
    _randomize(model, gen)
    with torch.no_grad():  # a positive layer weighting (a near-zero sum of 25 SiLUs would blow up)
        model.casual_audio_encoder.weights.copy_(1.0 + 0.2 * torch.randn(model.casual_audio_encoder.weights.shape,
                                                                          generator=gen))
    save_s2v(model, folder, max_shard_bytes=max_shard_bytes)
    speech = Wav2Vec2(Wav2Vec2Config(**TINY_WAV2VEC2))
    _randomize(speech, gen, std=0.2)
    save_wav2vec2(speech, folder / S2V_WAV2VEC_DIR)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="write a tiny random-weight Wan 2.2 checkpoint folder")
    p.add_argument("folder")
    p.add_argument("--task", default="t2v-A14B")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(build_tiny_checkpoint(args.folder, args.task, seed=args.seed))


if __name__ == "__main__":
    main()
