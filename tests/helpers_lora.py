"""Test helpers for LoRA: a tiny WanDiT with its diffusers twin, random ground-truth LoRAs, and
writers that spell the same tensors in every format wanx reads (diffusers' own readers are the
reference wherever diffusers reads that format)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from wanx.configs import DiTConfig
from wanx.loading.keymaps_dit import diffusers_to_official, official_to_diffusers_key
from wanx.model import WanDiT

GRID = (3, 8, 8)  # latent T, H, W -> 48 tokens
CTX_LEN = 7
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def randomize_(module: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter nonzero at a sensible scale (zero-initialised ones would hide key mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * noise)
            elif p.dim() >= 2 and "scale_shift_table" not in name and "modulation" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.2 * noise)


def tiny_cfg(**kw) -> DiTConfig:
    return DiTConfig.tiny("t2v", **kw)


def diffusers_model(cfg: DiTConfig, seed: int = 1):
    from diffusers import WanTransformer3DModel

    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps).eval()
    randomize_(ref, seed)
    return ref


def wanx_from_diffusers(ref, cfg: DiTConfig) -> WanDiT:
    """A WanDiT holding copies of the (LoRA-free) diffusers weights."""
    ours = WanDiT(cfg).eval()
    base = {k.replace(".base_layer.", "."): v for k, v in ref.state_dict().items() if "lora_" not in k}
    ours.load_state_dict(diffusers_to_official(base), strict=True)
    return ours


def make_inputs(cfg: DiTConfig, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, *GRID, generator=g)
    ctx = torch.randn(1, CTX_LEN, cfg.text_dim, generator=g)
    return x, torch.tensor([937.0]), ctx


@torch.no_grad()
def run_wanx(model: WanDiT, inputs) -> torch.Tensor:
    x, t, ctx = inputs
    return model(x, t, ctx)


@torch.no_grad()
def run_diffusers(ref, inputs, text_len: int = 512) -> torch.Tensor:
    x, t, ctx = inputs
    return ref(x, t, F.pad(ctx, (0, 0, 0, text_len - ctx.shape[1])), return_dict=False)[0]


# ------------------------------------------------------------------------------------ ground truth

@dataclass
class Truth:
    """A LoRA as plain tensors on official names: pairs (down, up, alpha) and whole-tensor deltas."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float | None]] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)  # official parameter -> delta

    def dense(self, module: str) -> torch.Tensor:
        down, up, alpha = self.pairs[module]
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        return scale * (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:])


def random_truth(model: WanDiT, modules, rank: int = 4, alpha: float | None = 6.0, seed: int = 3,
                 gain: float = 0.3) -> Truth:
    """Random pairs on ``modules`` (alpha only inside the blocks unless ``alpha`` is forced)."""
    g = torch.Generator().manual_seed(seed)
    truth = Truth()
    for m in modules:
        w = model.get_parameter(f"{m}.weight")
        out_dim, in_dim = w.shape[0], w[0].numel()
        down = torch.randn(rank, *w.shape[1:], generator=g) / in_dim ** 0.5
        up = gain * torch.randn(out_dim, rank, *([1] * (w.dim() - 2)), generator=g)
        truth.pairs[m] = (down, up, alpha if m.startswith("blocks.") else None)
    return truth


def block_linears(num_layers: int) -> list[str]:
    return [f"blocks.{i}.{n}" for i in range(num_layers) for n in BLOCK_LINEARS]


# ------------------------------------------------------------------------------------ wanx-only checks

RICH_OUTSIDE = ["time_projection.1", "head.head", "text_embedding.0", "time_embedding.2", "patch_embedding"]


def make_experts(cfg=None, dtype=torch.float32):
    """Two tiny WanDiTs (high, low) with different random weights, the same on every call."""
    cfg = cfg or tiny_cfg()
    experts = []
    for seed in (1, 2):
        m = WanDiT(cfg).eval()
        randomize_(m, seed)
        experts.append(m.to(dtype))
    return tuple(experts)


def snapshot(*models):
    """Copies of every tensor of each model, to check later that nothing changed."""
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]


def assert_bit_identical(models, snap):
    """Every tensor of each model equals its snapshot bit for bit."""
    for m, s in zip(models, snap):
        now = m.state_dict()
        assert now.keys() == s.keys()
        changed = [k for k in s if not torch.equal(now[k], s[k])]
        assert not changed, f"weights changed: {changed[:5]}"


def rich_lora(model, tmp_path, name="rich.safetensors", seed=3) -> tuple:
    """Pairs on every block Linear and outside the blocks (conv included), plus full deltas."""
    truth = random_truth(model, block_linears(model.cfg.num_layers) + RICH_OUTSIDE, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    for p in ("blocks.0.self_attn.q.bias", "blocks.1.ffn.0.bias", "blocks.0.norm3.weight", "blocks.1.modulation",
              "head.modulation", "blocks.0.cross_attn.norm_k.weight"):
        truth.diffs[p] = 0.1 * torch.randn(model.get_parameter(p).shape, generator=g)
    return truth, write(comfy_sd(truth), tmp_path / name)


# ------------------------------------------------------------------------------------ writers

def _alpha(v: float) -> torch.Tensor:
    return torch.tensor(v)


def comfy_sd(truth: Truth, prefix: str = "diffusion_model.", down: str = "lora_down", up: str = "lora_up",
             suffix: str = ".weight") -> dict[str, torch.Tensor]:
    """Official names (optionally prefixed) with any up/down spelling, ``.alpha`` and ``.diff*`` keys."""
    sd = {}
    for m, (d, u, a) in truth.pairs.items():
        sd[f"{prefix}{m}.{down}{suffix}"] = d.contiguous()
        sd[f"{prefix}{m}.{up}{suffix}"] = u.contiguous()
        if a is not None:
            sd[f"{prefix}{m}.alpha"] = _alpha(a)
    for name, delta in truth.diffs.items():
        sd[prefix + lightx2v_name(name)] = delta.contiguous()
    return sd


def lightx2v_name(param: str) -> str:
    """LightX2V extractor names: ``.weight`` -> ``.diff``, ``.bias`` -> ``.diff_b``, ``.modulation`` -> ``.diff_m``."""
    for src, dst in ((".weight", ".diff"), (".bias", ".diff_b"), (".modulation", ".diff_m")):
        if param.endswith(src):
            return param[: -len(src)] + dst
    return param + ".diff"


def kohya_sd(truth: Truth, variant: str = "plain") -> dict[str, torch.Tensor]:
    """musubi naming: ``lora_unet_`` + dots as underscores; "wanfun" doubles the underscore, "hybrid"
    keeps the dots after the block number."""
    sd = {}
    for m, (d, u, a) in truth.pairs.items():
        if variant == "hybrid":
            i, rest = m.split(".", 2)[1], m.split(".", 2)[2]
            name = f"lora_unet_blocks_{i}.{rest}"
        else:
            name = ("lora_unet__" if variant == "wanfun" else "lora_unet_") + m.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = d.contiguous()
        sd[f"{name}.lora_up.weight"] = u.contiguous()
        sd[f"{name}.alpha"] = _alpha(a if a is not None else d.shape[0])
    return sd


def write(sd: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------ diffusers side

def diffusers_load(ref, files: list[tuple[Path, float]]):
    """Load LoRA files into a diffusers transformer the way ``WanPipeline.load_lora_weights`` does."""
    from diffusers import WanPipeline

    names = []
    for i, (path, _) in enumerate(files):
        sd, md = WanPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        ref.load_lora_adapter(sd, prefix="transformer", metadata=md, adapter_name=f"lora{i}")
        names.append(f"lora{i}")
    ref.set_adapters(names, [s for _, s in files])
    return ref


@torch.no_grad()
def add_to_diffusers(ref, official_param: str, delta: torch.Tensor) -> None:
    """Hand-merge a delta into the diffusers model (for what diffusers' readers drop or lack)."""
    name = official_to_diffusers_key(official_param)
    params = dict(ref.named_parameters())
    if name not in params:  # a PEFT-wrapped layer keeps its weight under base_layer
        name = name.rsplit(".", 1)[0] + ".base_layer." + name.rsplit(".", 1)[1]
    params[name].add_(delta.view(params[name].shape))
