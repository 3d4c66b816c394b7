"""Load, convert and save Wan VAEs: official ``.pth``, official-name safetensors, diffusers ``vae/`` folders.

The model (:class:`wanx.vae.WanVAE`) uses the official state-dict names, so official files load
with no mapping; diffusers ``AutoencoderKLWan`` names are mapped by
:func:`vae_diffusers_to_official` (and back by :func:`vae_official_to_diffusers`, its exact
inverse). Without a config, the architecture is inferred from tensor shapes.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..configs import VAEConfig
from ..vae import WanVAE
from .safe import CheckpointError, StateDict, build_on_meta, load_pth, load_safetensors, load_sharded_folder

OFFICIAL_FILES = ("Wan2.2_VAE.pth", "Wan2.1_VAE.pth")
_META_KEY = "wanx_vae_config"  # safetensors metadata written by save_vae

# ------------------------------------------------------------------------------------- key maps
# Renames inside one residual block / attention block / head (official -> diffusers).
_RES = {"residual.0.gamma": "norm1.gamma", "residual.2": "conv1", "residual.3.gamma": "norm2.gamma",
        "residual.6": "conv2", "shortcut": "conv_shortcut"}
_TOP = [("conv1.", "quant_conv."), ("conv2.", "post_quant_conv.")]
_PART = [("conv1.", "conv_in."), ("head.0.", "norm_out."), ("head.2.", "conv_out."),
         ("middle.0.", "mid_block.resnets.0."), ("middle.1.", "mid_block.attentions.0."),
         ("middle.2.", "mid_block.resnets.1.")]


def _rename_res(rest: str, table: dict[str, str]) -> str:
    for a, b in table.items():
        if rest == a or rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def _is_resample(sub: str) -> bool:
    return sub.startswith("resample.") or sub.startswith("time_conv.")


def _groups_21_decoder(sd: StateDict) -> dict[int, tuple[int, str]]:
    """Flat 2.1 ``decoder.upsamples.N`` -> (up block, "resnets.j" | "upsamplers.0"); stages end at resamples."""
    idx: dict[int, bool] = {}
    for k in sd:
        m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)", k)
        if m:
            idx[int(m.group(1))] = idx.get(int(m.group(1)), False) or _is_resample(m.group(2))
    out, block, j = {}, 0, 0
    for n in sorted(idx):
        if idx[n]:
            out[n] = (block, "upsamplers.0")
            block, j = block + 1, 0
        else:
            out[n] = (block, f"resnets.{j}")
            j += 1
    return out


def vae_official_to_diffusers(sd: StateDict, version: str) -> StateDict:
    """Rename an official Wan VAE state dict to diffusers ``AutoencoderKLWan`` names (tensors shared)."""
    dec21 = _groups_21_decoder(sd) if version == "2.1" else {}
    out: StateDict = {}
    for k, v in sd.items():
        out[_official_key_to_diffusers(k, version, dec21)] = v
    return out


def _official_key_to_diffusers(k: str, version: str, dec21: dict[int, tuple[int, str]]) -> str:
    for a, b in _TOP:
        if k.startswith(a):
            return b + k[len(a):]
    part, rest = k.split(".", 1)
    for a, b in _PART:
        if rest.startswith(a):
            return f"{part}.{b}{_rename_res(rest[len(a):], _RES)}"
    if version == "2.1":
        m = re.match(r"downsamples\.(\d+)\.(.*)", rest)
        if m:
            return f"{part}.down_blocks.{m.group(1)}.{_rename_res(m.group(2), _RES)}"
        m = re.match(r"upsamples\.(\d+)\.(.*)", rest)
        if m:
            block, slot = dec21[int(m.group(1))]
            return f"{part}.up_blocks.{block}.{slot}.{_rename_res(m.group(2), _RES)}"
    else:
        m = re.match(r"(down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)", rest)
        if m:
            kind, s, j, sub = m.groups()
            blocks = "down_blocks" if kind == "down" else "up_blocks"
            if _is_resample(sub):
                return f"{part}.{blocks}.{s}.{kind}sampler.{sub}"
            return f"{part}.{blocks}.{s}.resnets.{j}.{_rename_res(sub, _RES)}"
    raise CheckpointError(f"no diffusers name for official Wan {version} VAE key {k!r}")


def vae_diffusers_to_official(sd: StateDict, version: str) -> StateDict:
    """Rename a diffusers ``AutoencoderKLWan`` state dict to official Wan names (inverse of the above)."""
    inv_res = {b: a for a, b in _RES.items()}
    # Resnet counts per block are needed to flatten 2.1 up blocks and to index 2.2 resamplers.
    n_res: dict[tuple[str, int], int] = {}
    has_sampler: set[tuple[str, int]] = set()
    for k in sd:
        m = re.match(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\."
                     r"(resnets\.(\d+)|upsamplers|downsampler|upsampler)", k)
        if m:
            key = (m.group(1), int(m.group(2)))
            if m.group(4) is not None:
                n_res[key] = max(n_res.get(key, 0), int(m.group(4)) + 1)
            else:
                has_sampler.add(key)
    flat_start: dict[int, int] = {}
    if version == "2.1":
        pos = 0
        for b in sorted({blk for (part, blk) in list(n_res) + list(has_sampler) if part == "decoder"}):
            flat_start[b] = pos
            pos += n_res.get(("decoder", b), 0) + (1 if ("decoder", b) in has_sampler else 0)
    out: StateDict = {}
    for k, v in sd.items():
        out[_diffusers_key_to_official(k, version, inv_res, n_res, flat_start)] = v
    return out


def _diffusers_key_to_official(k: str, version: str, inv_res: dict[str, str],
                               n_res: dict[tuple[str, int], int], flat_start: dict[int, int]) -> str:
    for a, b in _TOP:
        if k.startswith(b):
            return a + k[len(b):]
    part, rest = k.split(".", 1)
    for a, b in _PART:
        if rest.startswith(b):
            return f"{part}.{a}{_rename_res(rest[len(b):], inv_res)}"
    if version == "2.1":
        m = re.match(r"down_blocks\.(\d+)\.(.*)", rest)
        if m:
            return f"{part}.downsamples.{m.group(1)}.{_rename_res(m.group(2), inv_res)}"
        m = re.match(r"up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)", rest)
        if m:
            b = int(m.group(1))
            n = flat_start[b] + (int(m.group(3)) if m.group(3) is not None else n_res.get((part, b), 0))
            return f"{part}.upsamples.{n}.{_rename_res(m.group(4), inv_res)}"
    else:
        m = re.match(r"(down|up)_blocks\.(\d+)\.(?:resnets\.(\d+)|(?:down|up)sampler)\.(.*)", rest)
        if m:
            kind, s, j, sub = m.groups()
            s = int(s)
            j = int(j) if j is not None else n_res.get((part, s), 0)
            sub = _rename_res(sub, inv_res) if m.group(3) is not None else sub
            return f"{part}.{kind}samples.{s}.{kind}samples.{j}.{sub}"
    raise CheckpointError(f"no official name for diffusers Wan {version} VAE key {k!r}")


# ---------------------------------------------------------------------------- config inference
def infer_vae_config(sd: StateDict) -> VAEConfig:
    """Guess a :class:`VAEConfig` from official-name tensor shapes (no attention in the stages)."""
    try:
        conv_in = sd["encoder.conv1.weight"]
        z_dim = sd["conv2.weight"].shape[0]
        dec_head = sd["decoder.head.2.weight"]
    except KeyError as e:
        raise CheckpointError(f"not a Wan VAE state dict (no {e.args[0]}); pass config= for other layouts") from None
    version = "2.2" if conv_in.shape[1] == 12 else "2.1"
    dim = conv_in.shape[0]
    if any(".to_qkv." in k for k in sd if ".middle." not in k):
        raise CheckpointError("cannot infer attn_scales from a VAE with attention in its stages; pass config=")
    stages = _encoder_stages(sd, version)  # [(n_res, out_channels, temporal_resample | None)]
    dim_mult = tuple(out // dim for _, out, _ in stages)
    temporal = tuple(bool(t) for _, _, t in stages[:-1])
    kw: dict[str, Any] = dict(version=version, dim=dim, z_dim=z_dim, dim_mult=dim_mult,
                              num_res_blocks=stages[0][0], temperal_downsample=temporal)
    dec_dim = dec_head.shape[1] // dim_mult[0]
    if version == "2.2" or dec_dim != dim:
        kw["dec_dim"] = dec_dim
    default_len = 48 if version == "2.2" else 16
    if z_dim != default_len:
        warnings.warn(f"VAE with z_dim={z_dim}: no official latent statistics; using mean 0, std 1 "
                      "(pass config= to set them)", stacklevel=3)
        kw.update(latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
    return VAEConfig(**kw)


def _encoder_stages(sd: StateDict, version: str) -> list[tuple[int, int, bool | None]]:
    """Per encoder stage: residual block count, output channels, and (if it resamples) temporal?"""
    def out_ch(prefix: str) -> int:
        return sd[f"{prefix}.residual.2.weight"].shape[0]

    stages: list[tuple[int, int, bool | None]] = []
    if version == "2.2":
        s = 0
        while f"encoder.downsamples.{s}.downsamples.0.residual.0.gamma" in sd:
            j, n = 0, 0
            while any(k.startswith(f"encoder.downsamples.{s}.downsamples.{j}.") for k in sd):
                n += f"encoder.downsamples.{s}.downsamples.{j}.residual.0.gamma" in sd
                j += 1
            last = f"encoder.downsamples.{s}.downsamples.{j - 1}"
            resample = f"{last}.resample.1.weight" in sd
            stages.append((n, out_ch(f"encoder.downsamples.{s}.downsamples.0"),
                           (f"{last}.time_conv.weight" in sd) if resample else None))
            s += 1
        return stages
    i, n, ch = 0, 0, 0
    while any(k.startswith(f"encoder.downsamples.{i}.") for k in sd):
        p = f"encoder.downsamples.{i}"
        if f"{p}.residual.0.gamma" in sd:
            n, ch = n + 1, out_ch(p)
        elif f"{p}.resample.1.weight" in sd:
            stages.append((n, ch, f"{p}.time_conv.weight" in sd))
            n = 0
        i += 1
    stages.append((n, ch, None))
    return stages


# ----------------------------------------------------------------------------------- loading
def _diffusers_config(folder: Path) -> VAEConfig:
    try:
        d = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {folder / 'config.json'}: {e}") from None
    v22 = bool(d.get("is_residual")) or d.get("patch_size") is not None
    z = d.get("z_dim", 16)
    kw: dict[str, Any] = dict(version="2.2" if v22 else "2.1", dim=d.get("base_dim", 96),
                              dec_dim=d.get("decoder_base_dim"), z_dim=z)
    for name in ("dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample", "dropout",
                 "latents_mean", "latents_std"):
        if name in d:
            kw[name] = d[name]
    return VAEConfig.from_dict(kw)


def _looks_diffusers(sd: StateDict) -> bool:
    return any(k.startswith(("quant_conv.", "post_quant_conv.", "encoder.conv_in.", "decoder.conv_in.")) for k in sd)


def _strip_prefix(sd: StateDict) -> StateDict:
    for p in ("vae.", "first_stage_model.", "model."):
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def _safetensors_config(path: Path) -> VAEConfig | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # corrupt files are reported by load_safetensors with a clear message
        return None
    return VAEConfig.from_dict(json.loads(meta[_META_KEY])) if _META_KEY in meta else None


def read_vae_state_dict(path: str | os.PathLike, config: VAEConfig | None = None,
                        version: str | None = None) -> tuple[StateDict, VAEConfig]:
    """Official-name state dict and config from any supported VAE file or folder."""
    path = Path(path)
    if path.is_dir():
        sd, config = _read_folder(path, config)
    elif not path.exists():
        raise CheckpointError(f"VAE checkpoint not found: {path}")
    elif path.suffix == ".safetensors":
        sd = _strip_prefix(load_safetensors(path))
        config = config or _safetensors_config(path)
    else:
        sd = _strip_prefix(load_pth(path))
    if _looks_diffusers(sd):
        v = (config.version if config else None) or version or _diffusers_version(sd)
        sd = vae_diffusers_to_official(sd, v)
    if config is None:
        config = infer_vae_config(sd)
    if version is not None and config.version != version:
        raise CheckpointError(f"{path} holds a Wan {config.version} VAE, but version={version!r} was requested")
    return sd, config


def _diffusers_version(sd: StateDict) -> str:
    return "2.2" if sd["encoder.conv_in.weight"].shape[1] == 12 else "2.1"


def _read_folder(folder: Path, config: VAEConfig | None) -> tuple[StateDict, VAEConfig | None]:
    if (folder / "vae" / "config.json").is_file():
        folder = folder / "vae"
    if (folder / "config.json").is_file():
        config = config or _diffusers_config(folder)
        return load_sharded_folder(folder), config
    for name in OFFICIAL_FILES:
        if (folder / name).is_file():
            if config is None and (folder / "wanx.json").is_file():
                vae_cfg = json.loads((folder / "wanx.json").read_text()).get("vae")
                config = VAEConfig.from_dict(vae_cfg) if vae_cfg else None
            return load_pth(folder / name), config
    raise CheckpointError(f"{folder} has no Wan VAE: expected a diffusers vae/ folder (config.json + "
                          f"safetensors) or one of {', '.join(OFFICIAL_FILES)}")


def load_vae(path: str | os.PathLike, *, config: VAEConfig | None = None, version: str | None = None,
             dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> WanVAE:
    """Load a Wan VAE from an official ``.pth``, an official-name ``.safetensors`` or a diffusers folder.

    ``config`` overrides what is read or inferred; ``version`` ("2.1"/"2.2") is checked against it.
    Keys must match exactly (strict); ``.pth`` files are read with ``weights_only=True``.
    """
    sd, cfg = read_vae_state_dict(path, config, version)
    model = build_on_meta(lambda: WanVAE(cfg), sd, dtype=dtype, device=device, what=f"Wan {cfg.version} VAE")
    return model.requires_grad_(False)  # type: ignore[return-value]


def save_vae(model: WanVAE, path: str | os.PathLike) -> None:
    """Write official-name weights: safetensors (config in the metadata), or a plain tensor dict for ``.pth``."""
    path = Path(path)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".pth", ".pt"):
        torch.save(sd, path)
    else:
        save_file(sd, str(path), metadata={_META_KEY: json.dumps(model.cfg.to_dict())})


def convert_vae(src: str | os.PathLike, dst: str | os.PathLike, *, config: VAEConfig | None = None,
                version: str | None = None, dtype: torch.dtype | None = None) -> VAEConfig:
    """Convert any supported VAE input to an official-name safetensors file; returns its config."""
    model = load_vae(src, config=config, version=version, dtype=dtype)
    save_vae(model, dst)
    return model.cfg
