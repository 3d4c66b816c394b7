"""Load and save Animate-14B's transformer: official keys <-> diffusers ``WanAnimateTransformer3DModel``.

The DiT part renames exactly as :mod:`wanx.loading.keymaps_dit`. The face branch needs more than
renames, mirroring what diffusers' converter does:

- ``face_adapter.fuser_blocks.{i}.linear1_kv`` (K rows then V rows) is diffusers' ``to_k`` + ``to_v``;
- LIA biases are ``[1, C, 1, 1]`` officially and ``[C]`` in diffusers;
- the official blur kernels (a fixed buffer, ``...conv2.0.kernel`` / ``...skip.0.kernel``) are not
  stored by diffusers, so they are dropped one way and re-created the other.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from ..configs import AnimateConfig
from ..device import resolve_dtype
from ..model.animate import WanAnimateDiT
from ..model.animate_face import blur_kernel
from .keymaps_dit import diffusers_to_official_key, official_to_diffusers_key, strip_single_file_prefix
from .safe import CheckpointError, StateDict, build_on_meta, load_sharded_folder, load_weights_file

OFFICIAL_CLASS = "WanAnimateModel"
DIFFUSERS_CLASS = "WanAnimateTransformer3DModel"
WEIGHTS_STEM = "diffusion_pytorch_model"
_ME = "motion_encoder."
_APP = _ME + "enc.net_app.convs."
# Official ResBlock sub-paths <-> diffusers ones (bias reshaped where the name ends in act_fn.bias).
_RES = {"conv1.0.weight": "conv1.weight", "conv1.1.bias": "conv1.act_fn.bias",
        "conv2.1.weight": "conv2.weight", "conv2.2.bias": "conv2.act_fn.bias", "skip.1.weight": "conv_skip.weight"}
_RES_INV = {v: k for k, v in _RES.items()}
# Image-context renames (Wan 2.1 I2V names in diffusers). Kept here, not in keymaps_dit: for the Wan
# 2.2 DiT these keys are foreign and must pass through its maps unchanged.
_IMAGE = {"img_emb.proj.0.": "condition_embedder.image_embedder.norm1.",
          "img_emb.proj.1.": "condition_embedder.image_embedder.ff.net.0.proj.",
          "img_emb.proj.3.": "condition_embedder.image_embedder.ff.net.2.",
          "img_emb.proj.4.": "condition_embedder.image_embedder.norm2.",
          ".cross_attn.k_img.": ".attn2.add_k_proj.", ".cross_attn.v_img.": ".attn2.add_v_proj.",
          ".cross_attn.norm_k_img.": ".attn2.norm_added_k."}
_IMAGE_INV = {v: k for k, v in _IMAGE.items()}
_FACE = {"linear1_q": "to_q", "linear2": "to_out", "q_norm": "norm_q", "k_norm": "norm_k"}
_FACE_INV = {v: k for k, v in _FACE.items()}


def _motion_to_diffusers(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor] | None:
    """One official motion-encoder tensor in diffusers naming (None: the blur kernel, not stored)."""
    if key.endswith(".kernel"):
        return None
    if key == _ME + "dec.direction.weight":
        return _ME + "motion_synthesis_weight", value
    if key.startswith(_ME + "enc.fc."):
        return _ME + "motion_network." + key[len(_ME + "enc.fc."):], value
    m = re.fullmatch(re.escape(_APP) + r"(\d+)\.(.+)", key)
    if m is None:
        raise CheckpointError(f"unknown motion-encoder key {key}")
    i, rest = int(m.group(1)), m.group(2)
    if i == 0:
        new = {"0.weight": "conv_in.weight", "1.bias": "conv_in.act_fn.bias"}[rest]
    elif rest == "weight":
        new = "conv_out.weight"
    else:
        new = f"res_blocks.{i - 1}.{_RES[rest]}"
    return _ME + new, value.flatten() if new.endswith("act_fn.bias") else value


def _motion_to_official(key: str, value: torch.Tensor, num_res: int) -> dict[str, torch.Tensor]:
    """One diffusers motion-encoder tensor in official naming (+ the blur kernels of its ResBlock)."""
    rest = key[len(_ME):]
    if rest == "motion_synthesis_weight":
        return {_ME + "dec.direction.weight": value}
    if rest.startswith("motion_network."):
        return {_ME + "enc.fc." + rest[len("motion_network."):]: value}
    if rest.startswith("conv_in."):
        if rest == "conv_in.weight":
            return {_APP + "0.0.weight": value}
        return {_APP + "0.1.bias": value.view(1, -1, 1, 1)}
    if rest == "conv_out.weight":
        return {_APP + f"{num_res + 1}.weight": value}
    m = re.fullmatch(r"res_blocks\.(\d+)\.(.+)", rest)
    if m is None or m.group(2) not in _RES_INV:
        raise CheckpointError(f"unknown motion-encoder key {key}")
    i = int(m.group(1)) + 1
    out = {f"{_APP}{i}.{_RES_INV[m.group(2)]}": value.view(1, -1, 1, 1) if rest.endswith("act_fn.bias") else value}
    if m.group(2) == "conv1.weight":  # once per ResBlock: the fixed blur buffers diffusers does not store
        out.update({f"{_APP}{i}.conv2.0.kernel": blur_kernel(), f"{_APP}{i}.skip.0.kernel": blur_kernel()})
    return out


def _rename_image(key: str, table: Mapping[str, str]) -> str | None:
    for src, dst in table.items():
        if key.startswith(src) or (src.startswith(".") and src in key):
            return key.replace(src, dst, 1)
    return None


def animate_official_to_diffusers(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """An official Animate transformer state dict in diffusers naming (tensors split/reshaped as needed)."""
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith(_ME):
            item = _motion_to_diffusers(key, value)
            if item is not None:
                out[item[0]] = item[1]
            continue
        m = re.fullmatch(r"face_adapter\.fuser_blocks\.(\d+)\.(\w+)\.(weight|bias)", key)
        if m:
            base = f"face_adapter.{m.group(1)}."
            if m.group(2) == "linear1_kv":
                k, v = value.chunk(2, dim=0)
                out[f"{base}to_k.{m.group(3)}"], out[f"{base}to_v.{m.group(3)}"] = k, v
            else:
                out[f"{base}{_FACE[m.group(2)]}.{m.group(3)}"] = value
            continue
        key = re.sub(r"^face_encoder\.(conv1_local|conv2|conv3)\.conv\.", r"face_encoder.\1.", key)
        out[_rename_image(key, _IMAGE) or official_to_diffusers_key(key)] = value
    return out


def animate_diffusers_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """A diffusers ``WanAnimateTransformer3DModel`` state dict in official naming."""
    num_res = len({k.split(".")[2] for k in sd if k.startswith(_ME + "res_blocks.")})
    out: StateDict = {}
    for key, value in sd.items():
        if key.startswith(_ME):
            out.update(_motion_to_official(key, value, num_res))
            continue
        m = re.fullmatch(r"face_adapter\.(\d+)\.(\w+)\.(weight|bias)", key)
        if m:
            base = f"face_adapter.fuser_blocks.{m.group(1)}."
            if m.group(2) == "to_k":
                out[f"{base}linear1_kv.{m.group(3)}"] = torch.cat([value, sd[key.replace(".to_k.", ".to_v.")]])
            elif m.group(2) != "to_v":  # to_v joined its to_k above
                out[f"{base}{_FACE_INV[m.group(2)]}.{m.group(3)}"] = value
            continue
        key = re.sub(r"^face_encoder\.(conv1_local|conv2|conv3)\.", r"face_encoder.\1.conv.", key)
        out[_rename_image(key, _IMAGE_INV) or diffusers_to_official_key(key)] = value
    return out


def is_diffusers_animate(keys) -> bool:
    return any(k.startswith(("condition_embedder.", "proj_out.", _ME + "conv_in.")) for k in keys)


# ---------------------------------------------------------------------------------------------- configs

# Fields a real official config.json does not carry; written by wanx only when not the default.
_EXTRA = ("text_dim", "patch_size", "qk_norm", "cross_attn_norm", "window_size", "image_dim", "image_tokens",
          "face_size", "motion_dim", "face_hidden_dim", "face_heads", "face_every")
_OFFICIAL_KEYS = ("text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads", "num_layers", "eps",
                  "motion_encoder_dim")


def animate_config_from_json(d: Mapping[str, Any]) -> AnimateConfig:
    """An AnimateConfig from an official (``WanAnimateModel``) or diffusers config.json."""
    cls = d.get("_class_name") or (DIFFUSERS_CLASS if "in_channels" in d else OFFICIAL_CLASS)
    if cls == OFFICIAL_CLASS:
        return AnimateConfig.from_dict({k: v for k, v in d.items() if k != "model_type"})
    if cls != DIFFUSERS_CLASS:
        raise CheckpointError(f"not an Animate transformer config: _class_name {cls!r}")
    heads = d.get("num_attention_heads", 40)
    base = AnimateConfig()
    return AnimateConfig(
        patch_size=tuple(d.get("patch_size", base.patch_size)), num_heads=heads,
        dim=heads * d.get("attention_head_dim", 128), in_dim=d.get("in_channels") or 36,
        out_dim=d.get("out_channels") or 16, text_dim=d.get("text_dim", base.text_dim),
        freq_dim=d.get("freq_dim", base.freq_dim), ffn_dim=d.get("ffn_dim", base.ffn_dim),
        num_layers=d.get("num_layers", base.num_layers), eps=d.get("eps", base.eps),
        cross_attn_norm=d.get("cross_attn_norm", True), image_dim=d.get("image_dim") or base.image_dim,
        face_size=d.get("motion_encoder_size", 512), motion_dim=d.get("motion_dim", 20),
        motion_encoder_dim=d.get("motion_encoder_dim", 512), face_hidden_dim=d.get("face_encoder_hidden_dim", 1024),
        face_heads=d.get("face_encoder_num_heads", 4), face_every=d.get("inject_face_latents_blocks", 5))


def animate_config_to_json(cfg: AnimateConfig, layout: str = "official") -> dict[str, Any]:
    """The config.json of ``layout`` ("official" or "diffusers") for ``cfg``."""
    if layout == "diffusers":
        return {"_class_name": DIFFUSERS_CLASS, "patch_size": list(cfg.patch_size),
                "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
                "in_channels": cfg.in_dim, "latent_channels": cfg.latent_dim, "out_channels": cfg.out_dim,
                "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
                "num_layers": cfg.num_layers, "cross_attn_norm": cfg.cross_attn_norm,
                "qk_norm": "rms_norm_across_heads", "eps": cfg.eps, "image_dim": cfg.image_dim,
                "added_kv_proj_dim": cfg.dim, "motion_encoder_size": cfg.face_size,
                "motion_dim": cfg.motion_dim, "motion_encoder_dim": cfg.motion_encoder_dim,
                "face_encoder_hidden_dim": cfg.face_hidden_dim, "face_encoder_num_heads": cfg.face_heads,
                "inject_face_latents_blocks": cfg.face_every}
    d, default = cfg.to_dict(), AnimateConfig().to_dict()
    out: dict[str, Any] = {"_class_name": OFFICIAL_CLASS, **{k: d[k] for k in _OFFICIAL_KEYS}}
    out.update({k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in _EXTRA if d[k] != default[k]})
    return out


# ---------------------------------------------------------------------------------------------- files

def read_animate_state_dict(path: str | os.PathLike) -> tuple[StateDict, dict[str, Any] | None]:
    """Official-key tensors of a folder (official or diffusers) or single file, and its config.json."""
    path = Path(path)
    json_cfg = None
    if path.is_dir():
        cfg_file = path / "config.json"
        if cfg_file.is_file():
            try:
                json_cfg = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from None
        sd = load_sharded_folder(path, WEIGHTS_STEM)
    else:
        sd = strip_single_file_prefix(load_weights_file(path))
    return (animate_diffusers_to_official(sd) if is_diffusers_animate(sd) else sd), json_cfg


def load_animate_dit(path: str | os.PathLike, *, config: AnimateConfig | Mapping[str, Any] | None = None,
                     dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu") -> WanAnimateDiT:
    """Load Animate's transformer strictly from an official or diffusers folder, or a single file."""
    sd, json_cfg = read_animate_state_dict(path)
    if config is None and json_cfg is None:
        raise CheckpointError(f"{path}: no config.json next to the weights; pass config=")
    cfg = config if isinstance(config, AnimateConfig) else animate_config_from_json(config or json_cfg)
    torch_dtype = None if dtype is None else resolve_dtype(dtype, torch.device(device))
    return build_on_meta(lambda: WanAnimateDiT(cfg), sd, strict=True, dtype=torch_dtype, device=device,
                         what=f"Animate DiT {path}")


def save_animate_dit(model: WanAnimateDiT, folder: str | os.PathLike, layout: str = "official") -> Path:
    """Write ``model`` as an official or diffusers folder (config.json + one safetensors file)."""
    from safetensors.torch import save_file

    from ..atomic import atomic_output

    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if layout == "diffusers":
        sd = animate_official_to_diffusers(sd)
    with atomic_output(folder / "config.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(animate_config_to_json(model.cfg, layout), indent=2) + "\n")
    with atomic_output(folder / f"{WEIGHTS_STEM}.safetensors", overwrite=True) as tmp:
        save_file(sd, str(tmp), metadata={"format": "pt"})
    return folder
