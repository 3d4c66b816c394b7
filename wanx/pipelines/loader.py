"""`load_pipeline`: read a checkpoint folder (official or diffusers) into a ready `WanPipeline`.

`describe_checkpoint` reads the same folder's configs only, so the resolver can check a request
against it before any weight is loaded.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from ..device import VAE_DTYPE, dit_dtype, resolve_device, resolve_dtype
from ..loading.layout import CheckpointLayout, find_checkpoint
from ..loading.safe import CheckpointError
from ..request import ModelFacts
from .pipeline import PipelineOptions, WanPipeline

log = logging.getLogger("wanx")

DEMO_DIR = Path(__file__).resolve().parent.parent / "demo" / "wanx-demo"


def demo_checkpoint_dir() -> Path:
    """The built-in demo model's folder (an official-layout checkpoint shipped with wanx)."""
    if not (DEMO_DIR / "wanx.json").is_file():
        raise CheckpointError(f"the built-in demo model is not present in this install ({DEMO_DIR}); "
                              f"pass a checkpoint folder (ckpt_dir=...)")
    return DEMO_DIR


def describe_checkpoint(ckpt_dir=None, task: str | None = None) -> tuple[CheckpointLayout, ModelFacts]:
    """The folder's layout and the facts the resolver needs, from its config files only."""
    from ..loading.dit import dit_config_from_json
    from ..loading.layout import read_json

    layout = find_checkpoint(ckpt_dir if ckpt_dir is not None else demo_checkpoint_dir(), task=task)
    configs = []
    for folder in layout.dit_paths:
        path = folder / "config.json"
        try:
            configs.append(dit_config_from_json(read_json(path)))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: {e}") from None
    if len(set(configs)) > 1:
        raise CheckpointError(f"the experts' config.json files disagree: "
                              f"{', '.join(str(p / 'config.json') for p in layout.dit_paths)}")
    spec = layout.spec
    if configs[0].model_type != spec.dit.model_type:
        raise CheckpointError(f"{layout.dit_paths[0] / 'config.json'} describes a {configs[0].model_type} model "
                              f"(in_dim {configs[0].in_dim}); task {spec.name} needs a {spec.dit.model_type} model")
    if layout.vae_config is not None and layout.vae_config.strides != spec.vae_stride:
        from dataclasses import replace

        spec = replace(spec, vae_strides=layout.vae_config.strides)
    return layout, ModelFacts(spec=spec, dit=configs[0], num_experts=len(layout.dit_paths))


def checkpoint_identity(layout: CheckpointLayout) -> dict:
    """Folder name, layout and a cheap fingerprint (config hashes and weight sizes) for the recipe.

    The full local path is left out: videos get shared, and a path says things about its owner.
    """
    digest = hashlib.sha256()
    total = 0
    for folder in layout.dit_paths:
        cfg = folder / "config.json"
        if cfg.is_file():
            digest.update(cfg.read_bytes())
        for f in sorted(folder.glob("*.safetensors")):
            total += f.stat().st_size
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"name": layout.root.resolve().name, "layout": layout.kind,
            "dit_fingerprint": digest.hexdigest()[:16], "dit_bytes": total}


def _load_text_encoder(layout: CheckpointLayout, dtype: torch.dtype):
    from ..loading.t5 import load_t5
    from ..text import TextEncoder, Tokenizer

    try:
        tokenizer = Tokenizer.from_folder(layout.tokenizer_dir, text_len=layout.spec.text_len)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # the tokenizers library raises its own untyped errors for a corrupt file
        raise CheckpointError(f"cannot read the tokenizer {layout.tokenizer_dir / 'tokenizer.json'}: {e}") from None
    model = load_t5(layout.t5_path, config=layout.t5_config, dtype=dtype, device="cpu")
    return TextEncoder(tokenizer, model, text_len=layout.spec.text_len)


def _load_vae(layout: CheckpointLayout, device: torch.device):
    from ..loading.vae import load_vae

    return load_vae(layout.vae_path, config=layout.vae_config, version=layout.spec.vae_version,
                    dtype=VAE_DTYPE, device=device)


def _load_experts(layout: CheckpointLayout, dtype: torch.dtype, device: torch.device, offload: bool):
    from ..loading.dit import load_dit

    home = torch.device("cpu") if offload else device
    return [load_dit(p, dtype=dtype, device=home) for p in layout.dit_paths]


def load_pipeline(ckpt_dir=None, task: str | None = None, device=None, dtype=None, *,
                  offload_model: bool = False, t5_cpu: bool = False, convert_model_dtype: bool = False,
                  batch_cfg: bool = True, vae_tiling: bool = False, compile: bool = False) -> WanPipeline:
    """Load every component of ``ckpt_dir`` (None: the built-in demo model) for ``task``.

    ``dtype`` is the DiT and text-encoder compute dtype (default float32 on CPU, bfloat16 on CUDA);
    ``convert_model_dtype`` forces the DiT to bfloat16 as the official flag does. The VAE runs in fp32.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    layout, _ = describe_checkpoint(ckpt_dir, task)  # every config checked before any weight is read
    options = PipelineOptions(offload_model=offload_model, t5_cpu=t5_cpu,
                              convert_model_dtype=convert_model_dtype, batch_cfg=batch_cfg,
                              vae_tiling=vae_tiling, compile=compile)
    text_encoder = _load_text_encoder(layout, dtype)
    vae = _load_vae(layout, device)
    experts = _load_experts(layout, dit_dtype(dtype, convert_model_dtype), device, offload_model)
    log.info("loaded %s (%s layout) from %s on %s", layout.spec.name, layout.kind, layout.root, device)
    return WanPipeline(layout.spec, text_encoder, vae, experts, device=device, options=options,
                       checkpoint=checkpoint_identity(layout))
