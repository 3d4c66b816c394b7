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
from ..errors import InputError
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


def describe_checkpoint(ckpt_dir=None, task: str | None = None, *,
                        dit_files=None) -> tuple[CheckpointLayout, ModelFacts]:
    """The folder's layout and the facts the resolver needs, from its config files only.

    ``dit_files``: per-expert DiT single files replacing the folder's experts (read from their
    headers; see :func:`wanx.quant.files.describe_dit_files`).
    """
    from ..loading.dit import dit_config_from_json
    from ..loading.layout import read_json

    if dit_files is not None:
        from ..quant.files import describe_dit_files

        root = Path(ckpt_dir) if ckpt_dir is not None else demo_checkpoint_dir()
        layout, dit = describe_dit_files(root, task, dit_files)
        return layout, ModelFacts(spec=layout.spec, dit=dit, num_experts=len(layout.dit_paths))
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
        if folder.is_file():  # a dit_files entry
            total += folder.stat().st_size
            digest.update(f"{folder.name}:{folder.stat().st_size}".encode())
            continue
        cfg = folder / "config.json"
        if cfg.is_file():
            digest.update(cfg.read_bytes())
        for f in sorted(folder.glob("*.safetensors")):
            total += f.stat().st_size
            digest.update(f"{f.name}:{f.stat().st_size}".encode())
    return {"name": layout.root.resolve().name, "layout": layout.kind,
            "dit_fingerprint": digest.hexdigest()[:16], "dit_bytes": total}


def _load_text_encoder(layout: CheckpointLayout, dtype: torch.dtype, quantize: str | None = None):
    from ..loading.t5 import load_t5
    from ..text import TextEncoder, Tokenizer

    try:
        tokenizer = Tokenizer.from_folder(layout.tokenizer_dir, text_len=layout.spec.text_len)
    except FileNotFoundError as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # the tokenizers library raises its own untyped errors for a corrupt file
        raise CheckpointError(f"cannot read the tokenizer {layout.tokenizer_dir / 'tokenizer.json'}: {e}") from None
    model = load_t5(layout.t5_path, config=layout.t5_config, dtype=dtype, device="cpu")
    if quantize is not None:
        from ..quant import quantize_model_

        quantize_model_(model, quantize)
    return TextEncoder(tokenizer, model, text_len=layout.spec.text_len)


def _load_vae(layout: CheckpointLayout, device: torch.device):
    from ..loading.vae import load_vae

    return load_vae(layout.vae_path, config=layout.vae_config, version=layout.spec.vae_version,
                    dtype=VAE_DTYPE, device=device)


def _load_expert(path: Path, dit, dtype: torch.dtype, device: torch.device, quantize: str | None):
    """One expert: a folder or a dit_files entry, whose content picks the loader."""
    from ..loading.dit import load_dit

    if path.is_file():
        from ..quant import is_quantized_file, load_quantized_dit

        if is_quantized_file(path):
            return load_quantized_dit(path, dtype, device, config=dit)
    config = dit if path.is_file() else None  # a file has no config.json: use the one describe checked
    if quantize is not None:
        from ..quant import load_dit_quantizing

        return load_dit_quantizing(path, quantize, dtype, device, config=config)
    return load_dit(path, config=config, dtype=dtype, device=device)


def _load_experts(layout: CheckpointLayout, facts: ModelFacts, dtype: torch.dtype, device: torch.device,
                  offload: bool, quantize: str | None = None):
    home = torch.device("cpu") if offload else device
    return [_load_expert(p, facts.dit, dtype, home, quantize) for p in layout.dit_paths]


def _check_quantize(layout: CheckpointLayout, quantize: str | None, t5_quantize: str | None) -> None:
    """Refuse an unknown kind, or quantizing DiT files that are quantized already, before loading."""
    if quantize is None and t5_quantize is None:
        return
    from ..quant import check_kind, is_quantized_file

    for arg, kind in (("quantize", quantize), ("t5_quantize", t5_quantize)):
        if kind is not None:
            check_kind(kind, arg)
    coded = [p for p in layout.dit_paths if p.is_file() and is_quantized_file(p)]
    if quantize is not None and coded:
        raise InputError("quantize", f"{coded[0]} is quantized already; drop {{arg}}")


def _quant_identity(dit_files, quantize: str | None, t5_quantize: str | None) -> dict:
    """What the recipe records of per-expert files and quantization (names only, never paths)."""
    out = {}
    if dit_files is not None:
        from ..quant import quantized_format
        from ..quant.files import as_file_list

        out["dit_files"] = [{"name": p.name, "format": quantized_format(p)} for p in as_file_list(dit_files)]
    return out | {k: v for k, v in (("quantize", quantize), ("t5_quantize", t5_quantize)) if v is not None}


def load_pipeline(ckpt_dir=None, task: str | None = None, device=None, dtype=None, *,
                  offload_model: bool = False, t5_cpu: bool = False, convert_model_dtype: bool = False,
                  batch_cfg: bool = True, vae_tiling: bool = False, compile: bool = False,
                  dit_files=None, quantize: str | None = None, t5_quantize: str | None = None) -> WanPipeline:
    """Load every component of ``ckpt_dir`` (None: the built-in demo model) for ``task``.

    ``dtype`` is the DiT and text-encoder compute dtype (default float32 on CPU, bfloat16 on CUDA);
    ``convert_model_dtype`` forces the DiT to bfloat16 as the official flag does. The VAE runs in fp32.
    ``dit_files``: the DiT as single files instead of the folder's experts, (high, low) for a
    two-expert task or one file: GGUF, quantized or plain safetensors (T5, VAE and tokenizer
    still come from ``ckpt_dir``). ``quantize`` / ``t5_quantize``: "int8" or "fp8" weight-only
    quantization of the DiT's / the umT5 encoder's block Linear layers while loading.
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    layout, facts = describe_checkpoint(ckpt_dir, task, dit_files=dit_files)  # every config checked
    _check_quantize(layout, quantize, t5_quantize)  # before any weight is read
    options = PipelineOptions(offload_model=offload_model, t5_cpu=t5_cpu,
                              convert_model_dtype=convert_model_dtype, batch_cfg=batch_cfg,
                              vae_tiling=vae_tiling, compile=compile)
    text_encoder = _load_text_encoder(layout, dtype, t5_quantize)
    vae = _load_vae(layout, device)
    experts = _load_experts(layout, facts, dit_dtype(dtype, convert_model_dtype), device, offload_model, quantize)
    log.info("loaded %s (%s layout) from %s on %s", layout.spec.name, layout.kind, layout.root, device)
    identity = checkpoint_identity(layout) | _quant_identity(dit_files, quantize, t5_quantize)
    return WanPipeline(layout.spec, text_encoder, vae, experts, device=device, options=options,
                       checkpoint=identity)
