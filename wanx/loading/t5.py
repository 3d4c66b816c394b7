"""Loading and saving the umT5 encoder: official ``.pth`` files and transformers ``text_encoder/`` folders.

Official keys are those of :class:`wanx.text.UMT5Encoder`; the transformers side is
``UMT5EncoderModel`` (per-layer ``relative_attention_bias``) or, for ``shared_pos=True``, the
classic ``T5EncoderModel`` (one table, stored in layer 0 and shared by all layers).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..configs import T5Config
from .safe import CheckpointError, StateDict, build_on_meta, load_sharded_folder, load_weights_file

__all__ = ["load_t5", "save_t5", "save_t5_hf", "t5_official_to_hf", "t5_hf_to_official",
           "t5_config_from_hf", "t5_config_to_hf", "infer_t5_config", "OFFICIAL_T5_FILE"]

OFFICIAL_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"

_HF_EMBED_KEYS = ("shared.weight", "encoder.embed_tokens.weight")

# Per-block official suffix -> transformers suffix under ``encoder.block.{i}.``.
_BLOCK_MAP = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_BLOCK_MAP_INV = {v: k for k, v in _BLOCK_MAP.items()}
_SHARED_POS_HF = "encoder.block.0." + _BLOCK_MAP["pos_embedding.embedding.weight"]

_OFFICIAL_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.(.+)")


# ---------------------------------------------------------------------------------------------
# Key maps
# ---------------------------------------------------------------------------------------------

def t5_official_to_hf(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Official keys -> transformers keys; the embedding is written as both ``shared`` and ``encoder.embed_tokens``.

    A top-level ``pos_embedding`` (``shared_pos=True``) goes to layer 0, where classic T5 keeps it.
    Keys that are not T5 encoder keys are an error naming them.
    """
    out: StateDict = {}
    unknown = []
    for key, value in sd.items():
        m = _OFFICIAL_BLOCK.fullmatch(key)
        if key == "token_embedding.weight":
            for hf_key in _HF_EMBED_KEYS:
                out[hf_key] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key == "pos_embedding.embedding.weight":
            out[_SHARED_POS_HF] = value
        elif m and m.group(2) in _BLOCK_MAP:
            out[f"encoder.block.{m.group(1)}.{_BLOCK_MAP[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"not umT5 encoder keys: {', '.join(sorted(unknown)[:20])}")
    return out


def _looks_shared_pos(sd: Mapping[str, torch.Tensor]) -> bool:
    """Classic T5 layout: a bias table in layer 0 only (needs two or more layers to tell)."""
    per_layer = _BLOCK_MAP["pos_embedding.embedding.weight"]
    return _SHARED_POS_HF in sd and f"encoder.block.1.{per_layer}" not in sd and any(
        k.startswith("encoder.block.1.") for k in sd)


def t5_hf_to_official(sd: Mapping[str, torch.Tensor], *, shared_pos: bool | None = None) -> StateDict:
    """Transformers keys -> official keys (exact inverse of :func:`t5_official_to_hf`).

    Either or both of ``shared.weight`` / ``encoder.embed_tokens.weight`` give the token embedding
    (``shared`` wins: transformers ties the encoder's embedding to it). With ``shared_pos`` (None:
    detected from the keys) the layer-0 ``relative_attention_bias`` becomes the top-level
    ``pos_embedding``. Decoder and LM-head keys of a full encoder-decoder checkpoint are dropped;
    anything else unknown is an error.
    """
    if shared_pos is None:
        shared_pos = _looks_shared_pos(sd)
    out: StateDict = {}
    unknown = []
    for key, value in sd.items():
        m = _HF_BLOCK.fullmatch(key)
        if key in _HF_EMBED_KEYS:
            continue
        if key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif shared_pos and key == _SHARED_POS_HF:
            out["pos_embedding.embedding.weight"] = value
        elif m and m.group(2) in _BLOCK_MAP_INV:
            out[f"blocks.{m.group(1)}.{_BLOCK_MAP_INV[m.group(2)]}"] = value
        elif not key.startswith(("decoder.", "lm_head.")):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"not umT5 encoder keys: {', '.join(sorted(unknown)[:20])}")
    embed = next((sd[k] for k in _HF_EMBED_KEYS if k in sd), None)
    if embed is not None:
        out["token_embedding.weight"] = embed
    return out


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def t5_config_from_hf(d: Mapping[str, Any]) -> T5Config:
    """A transformers ``UMT5Config``/``T5Config`` dict (config.json) -> :class:`T5Config`."""
    act = d.get("feed_forward_proj", "gated-gelu")
    if act not in ("gated-gelu", "gated-gelu_new"):
        raise CheckpointError(f"unsupported T5 feed-forward {act!r}: the umT5 encoder is gated-gelu")
    try:
        return T5Config(
            vocab_size=int(d["vocab_size"]), dim=int(d["d_model"]),
            dim_attn=int(d["d_kv"]) * int(d["num_heads"]), dim_ffn=int(d["d_ff"]),
            num_heads=int(d["num_heads"]), num_layers=int(d["num_layers"]),
            num_buckets=int(d.get("relative_attention_num_buckets", 32)),
            # classic T5 computes one bias table in layer 0 and shares it; umT5 has one per layer.
            shared_pos=d.get("model_type", "umt5") == "t5",
            eps=float(d.get("layer_norm_epsilon", 1e-6)),
            max_distance=int(d.get("relative_attention_max_distance", 128)))
    except KeyError as e:
        raise CheckpointError(f"T5 config.json lacks {e.args[0]!r}") from None


def t5_config_to_hf(cfg: T5Config) -> dict[str, Any]:
    """:class:`T5Config` -> a config.json dict that transformers reads as ``UMT5EncoderModel`` (or T5)."""
    umt5 = not cfg.shared_pos
    return {
        "architectures": ["UMT5EncoderModel" if umt5 else "T5EncoderModel"],
        "model_type": "umt5" if umt5 else "t5",
        "vocab_size": cfg.vocab_size, "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.dim_ffn,
        "num_heads": cfg.num_heads, "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_layers,
        "relative_attention_num_buckets": cfg.num_buckets,
        "relative_attention_max_distance": cfg.max_distance,
        "layer_norm_epsilon": cfg.eps, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
        "is_gated_act": True, "dropout_rate": 0.1, "is_encoder_decoder": True,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "tie_word_embeddings": False, "tokenizer_class": "T5Tokenizer",
    }


def infer_t5_config(sd: Mapping[str, torch.Tensor], base: T5Config | None = None) -> T5Config:
    """Sizes read off an official-key state dict (``eps``/``max_distance`` come from ``base``).

    For the real umT5-XXL file this gives exactly the default :class:`T5Config`.
    """
    base = base or T5Config()
    try:
        vocab, dim = sd["token_embedding.weight"].shape
        dim_attn = sd["blocks.0.attn.q.weight"].shape[0]
        dim_ffn = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not an official T5 encoder state dict: no {e.args[0]!r}") from None
    shared = "pos_embedding.embedding.weight" in sd
    pos_key = "pos_embedding.embedding.weight" if shared else "blocks.0.pos_embedding.embedding.weight"
    if pos_key not in sd:
        raise CheckpointError(f"not an official T5 encoder state dict: no {pos_key!r}")
    num_buckets, num_heads = sd[pos_key].shape
    layers = 1 + max(int(m.group(1)) for k in sd if (m := _OFFICIAL_BLOCK.fullmatch(k)))
    return base.replace(vocab_size=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=num_heads,
                        num_layers=layers, num_buckets=num_buckets, shared_pos=shared)


# ---------------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------------

def _is_hf_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _read_hf_folder(folder: Path) -> tuple[T5Config, StateDict]:
    """Config and official-key state dict of a transformers ``text_encoder/`` folder."""
    try:
        hf_cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"malformed {folder / 'config.json'}: {e}") from None
    cfg = t5_config_from_hf(hf_cfg)
    sd = load_sharded_folder(folder, stem="model")
    return cfg, t5_hf_to_official(sd, shared_pos=cfg.shared_pos)


def _resolve(path: Path) -> Path:
    """A weights file, a transformers folder, or a checkpoint root holding either."""
    if path.is_file() or _is_hf_folder(path):
        return path
    if path.is_dir():
        for candidate in (path / OFFICIAL_T5_FILE, path / "text_encoder"):
            if candidate.is_file() or _is_hf_folder(candidate):
                return candidate
        raise CheckpointError(
            f"no T5 encoder in {path}: looked for config.json (transformers folder), "
            f"{OFFICIAL_T5_FILE} and text_encoder/config.json")
    raise CheckpointError(f"checkpoint file not found: {path}")


def load_t5(path: str | os.PathLike, *, config: T5Config | None = None, dtype: torch.dtype | None = None,
            device: str | torch.device = "cpu") -> "UMT5Encoder":
    """Load the encoder from an official ``.pth``/``.safetensors`` or a transformers ``text_encoder/`` folder.

    ``config`` defaults to the sizes found in the file (umT5-XXL for the official checkpoint) or to
    the folder's config.json. ``dtype`` None keeps the stored dtype (bf16 for the official file).
    Built on the meta device and assigned with strict key and shape checks.
    """
    from ..text.umt5 import UMT5Encoder

    src = _resolve(Path(path))
    if src.is_dir():
        folder_cfg, sd = _read_hf_folder(src)
        cfg = config or folder_cfg
    else:
        sd = load_weights_file(src)
        cfg = config or infer_t5_config(sd)
    return build_on_meta(lambda: UMT5Encoder(cfg), sd, strict=True, dtype=dtype, device=device,
                         what=f"T5 encoder ({src})").requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Save
# ---------------------------------------------------------------------------------------------

def _plain_state_dict(model_or_sd) -> StateDict:
    sd = model_or_sd.state_dict() if isinstance(model_or_sd, torch.nn.Module) else dict(model_or_sd)
    # Own, contiguous storage per tensor: safetensors refuses shared storage, torch.save keeps views.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_t5(model, path: str | os.PathLike) -> Path:
    """Write official keys: ``.safetensors`` by suffix, otherwise a ``torch.save`` dict of tensors (``.pth``)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = _plain_state_dict(model)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def save_t5_hf(model, folder: str | os.PathLike) -> Path:
    """Write a transformers-loadable folder (config.json + model.safetensors) from an :class:`UMT5Encoder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = _plain_state_dict(t5_official_to_hf(model.state_dict()))
    hf_cfg = t5_config_to_hf(model.cfg)
    hf_cfg["dtype"] = str(next(iter(sd.values())).dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
