"""LoRA formats: every spelling wanx reads gives the same transformer output as diffusers.

Each test writes one LoRA file, applies it with wanx to a tiny WanDiT, and compares the output
with diffusers' WanTransformer3DModel holding the same base weights, loaded with diffusers' own
LoRA readers (``WanPipeline.lora_state_dict`` + ``load_lora_adapter``). Where diffusers cannot
read a spelling, it reads the same tensors in a spelling it does read; where it drops a tensor
(norm / modulation / patch-embedding deltas) or has no reader (LoHa, LoKr), the reference adds
the delta by hand, computed in the test from the format's published formula.
"""

from __future__ import annotations

import copy

import pytest
import torch

from wanx.lora import LoraStack

from helpers_lora import (Truth, add_to_diffusers, block_linears, comfy_sd, diffusers_load, diffusers_model,
                          kohya_sd, make_inputs, random_truth, rel_err, run_diffusers, run_wanx, tiny_cfg,
                          wanx_from_diffusers, write)

pytest.importorskip("diffusers")
pytest.importorskip("peft")
# peft warns about every 1-D lora_B.bias it exports (it suspects unsharded FSDP tensors).
pytestmark = pytest.mark.filterwarnings("ignore:.*invalid shape.*")

STRENGTH = 0.8
OUTSIDE_BLOCKS = ["time_projection.1", "head.head", "text_embedding.0", "text_embedding.2",
                  "time_embedding.0", "time_embedding.2"]


@pytest.fixture(scope="module")
def base():
    cfg = tiny_cfg()
    ref = diffusers_model(cfg)
    ours = wanx_from_diffusers(ref, cfg)
    inputs = make_inputs(cfg)
    return cfg, ref, ours, inputs


def _compare(base, path, ref_model, label, mode="fuse"):
    """wanx with ``path`` at STRENGTH vs the prepared diffusers model; returns the relative error."""
    cfg, ref, ours, inputs = base
    model = copy.deepcopy(ours)
    report = LoraStack((model,)).load(path, strength=STRENGTH, mode=mode)
    got, want = run_wanx(model, inputs), run_diffusers(ref_model, inputs)
    err, effect = rel_err(got, want), rel_err(want, run_diffusers(ref, inputs))
    print(f"{label}: {report.format}, {report.experts[0].modules} modules, rel err vs diffusers {err:.2e} "
          f"(LoRA changes the output by {effect:.2e})")
    assert effect > 1e-2, "the LoRA barely changes the output; the comparison would be vacuous"
    assert err <= 1e-5
    return report


def _diffusers_with(base, path):
    return diffusers_load(copy.deepcopy(base[1]), [(path, STRENGTH)])


# ------------------------------------------------------------------------------------ diffusers/PEFT

def _peft_file(base, tmp_path, prefixed: bool):
    """A LoRA made by peft itself on the diffusers twin, saved the way diffusers saves it."""
    from diffusers import WanPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    model = copy.deepcopy(base[1])
    config = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, lora_bias=True,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out",
                                        "time_proj", "linear_1", "linear_2", "patch_embedding"],
                        rank_pattern={"^blocks.1.attn1.to_q": 2}, alpha_pattern={"^blocks.0.ffn.net.2": 3})
    model.add_adapter(config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                gain = 0.05 if name.endswith("bias") else 0.3 / p[0].numel() ** 0.5
                p.copy_(torch.randn(p.shape, generator=g) * gain)
    state = get_peft_model_state_dict(model)
    if prefixed:
        WanPipeline.save_lora_weights(tmp_path, transformer_lora_layers=state,
                                      transformer_lora_adapter_metadata=config.to_dict(),
                                      weight_name="peft.safetensors")
        return tmp_path / "peft.safetensors"
    model.save_lora_adapter(tmp_path, weight_name="peft_bare.safetensors")
    return tmp_path / "peft_bare.safetensors"


def test_diffusers_peft(base, tmp_path):
    path = _peft_file(base, tmp_path, prefixed=True)
    report = _compare(base, path, _diffusers_with(base, path), "diffusers/PEFT (transformer. prefix)")
    assert report.format == "diffusers/PEFT"
    # 27 adapted layers: 20 block linears + patch/text x2/time x2/time_proj/proj_out; one has rank 2.
    assert report.ranks == {4: 26, 2: 1}
    assert report.experts[0].by_kind["embedding"] == 6  # patch (conv), text x2, time x2, time_proj


def test_diffusers_peft_without_prefix(base, tmp_path):
    path = _peft_file(base, tmp_path, prefixed=False)
    reference = _peft_file(base, tmp_path, prefixed=True)  # same tensors; diffusers needs the prefix
    _compare(base, path, _diffusers_with(base, reference), "diffusers/PEFT (no prefix, model-level save)")


# ------------------------------------------------------------------------------------ kohya / musubi

def _kohya_truth(base):
    return random_truth(base[2], block_linears(base[0].num_layers), rank=4, alpha=3.0, seed=7)


@pytest.mark.parametrize("variant", ["plain", "wanfun", "hybrid"])
def test_kohya(base, tmp_path, variant):
    truth = _kohya_truth(base)
    path = write(kohya_sd(truth, variant), tmp_path / f"kohya_{variant}.safetensors")
    # diffusers reads musubi's plain spelling only: it is the reference for all three.
    reference = write(kohya_sd(truth, "plain"), tmp_path / "kohya_ref.safetensors")
    report = _compare(base, path, _diffusers_with(base, reference), f"kohya {variant}")
    assert report.format.startswith("kohya")
    assert report.experts[0].modules == 20


# ------------------------------------------------------------------------------------ official names

def _comfy_truth(base, alpha=6.0):
    return random_truth(base[2], block_linears(base[0].num_layers) + OUTSIDE_BLOCKS, rank=4, alpha=alpha, seed=11)


@pytest.mark.parametrize("prefix,down,up", [("diffusion_model.", "lora_down", "lora_up"),
                                            ("diffusion_model.", "lora_A", "lora_B"),
                                            ("model.diffusion_model.", "lora_down", "lora_up")])
def test_official_names_with_prefix(base, tmp_path, prefix, down, up):
    truth = _comfy_truth(base)
    path = write(comfy_sd(truth, prefix, down, up), tmp_path / "comfy.safetensors")
    # diffusers only strips "diffusion_model."; the model.diffusion_model. file is read from that.
    reference = write(comfy_sd(truth, "diffusion_model.", down, up), tmp_path / "comfy_ref.safetensors")
    report = _compare(base, path, _diffusers_with(base, reference), f"official {prefix}*.{down}/{up}")
    assert report.format == "comfy" and report.experts[0].modules == 26


def test_bare_official_with_default_adapter(base, tmp_path):
    truth = _comfy_truth(base, alpha=None)  # DiffSynth-style files carry no alpha: scale 1
    path = write(comfy_sd(truth, "", "lora_A.default", "lora_B.default"), tmp_path / "bare.safetensors")
    reference = write(comfy_sd(truth, "diffusion_model.", "lora_A", "lora_B"), tmp_path / "ref.safetensors")
    report = _compare(base, path, _diffusers_with(base, reference), "bare official .default.")
    assert report.format == "official"


# ------------------------------------------------------------------------------------ LightX2V

def _lightx2v_truth(base) -> Truth:
    cfg, _, ours, _ = base
    truth = random_truth(ours, block_linears(cfg.num_layers), rank=4, alpha=8.0, seed=13)
    g = torch.Generator().manual_seed(17)

    def rnd(name, gain=0.05):
        return gain * torch.randn(ours.get_parameter(name).shape, generator=g)
    # Deltas diffusers applies itself: Linear biases (as lora_B.bias) and the head weight + bias.
    for m in ("blocks.0.self_attn.q", "blocks.1.cross_attn.o", "blocks.0.ffn.2"):
        truth.diffs[f"{m}.bias"] = rnd(f"{m}.bias")
    truth.diffs["head.head.weight"] = rnd("head.head.weight")
    truth.diffs["head.head.bias"] = rnd("head.head.bias")
    # Deltas diffusers drops (norms) or ignores (modulation, patch embedding): added by hand below.
    for name in ("blocks.0.norm3.weight", "blocks.0.norm3.bias", "blocks.1.self_attn.norm_q.weight",
                 "blocks.0.modulation", "head.modulation", "patch_embedding.weight", "patch_embedding.bias"):
        truth.diffs[name] = rnd(name, 0.2)
    return truth


DIFFUSERS_SKIPS = ("norm", "modulation", "patch_embedding")


def test_lightx2v_full_deltas(base, tmp_path):
    truth = _lightx2v_truth(base)
    sd = comfy_sd(truth)
    # ComfyUI's generic spelling of a modulation delta, next to LightX2V's diff_m on block 0.
    sd["diffusion_model.blocks.1.modulation.diff"] = 0.2 * torch.randn(base[2].blocks[1].modulation.shape)
    truth.diffs["blocks.1.modulation"] = sd["diffusion_model.blocks.1.modulation.diff"]
    path = write(sd, tmp_path / "lightx2v.safetensors")
    ref = _diffusers_with(base, path)
    for name, delta in truth.diffs.items():
        if any(s in name for s in DIFFUSERS_SKIPS):
            add_to_diffusers(ref, name, STRENGTH * delta)
    report = _compare(base, path, ref, "lightx2v (.diff/.diff_b/.diff_m)")
    assert report.format == "lightx2v"
    c = report.experts[0]
    assert c.params_fused == 20 + len(truth.diffs)
    assert c.by_kind["modulation"] == 2 and c.by_kind["norm"] == 2 and c.by_kind["head"] == 2


# ------------------------------------------------------------------------------------ LyCORIS

def _loha_sd(base, modules, rank=4, alpha=3.0):
    g = torch.Generator().manual_seed(19)
    sd, dense = {}, {}
    for m in modules:
        out_dim, in_dim = base[2].get_parameter(f"{m}.weight").shape
        f = {"hada_w1_a": torch.randn(out_dim, rank, generator=g) * 0.5,
             "hada_w1_b": torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5,
             "hada_w2_a": torch.randn(out_dim, rank, generator=g) * 0.5,
             "hada_w2_b": torch.randn(rank, in_dim, generator=g) / in_dim ** 0.5}
        sd.update({f"diffusion_model.{m}.{k}": v for k, v in f.items()})
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(alpha)
        # LoHa: (w1a w1b) * (w2a w2b) elementwise, times alpha / rank.
        dense[m] = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (alpha / rank)
    return sd, dense


def test_loha(base, tmp_path):
    sd, dense = _loha_sd(base, block_linears(base[0].num_layers))
    path = write(sd, tmp_path / "loha.safetensors")
    ref = copy.deepcopy(base[1])
    for m, delta in dense.items():
        add_to_diffusers(ref, f"{m}.weight", STRENGTH * delta)
    report = _compare(base, path, ref, "LoHa")
    assert report.format == "comfy + LoHa" and report.experts[0].modules == 20


def _lokr_sd(base):
    """Three LoKr layouts: w1 whole + w2 decomposed; w1 decomposed + w2 whole; both whole."""
    g = torch.Generator().manual_seed(23)
    r = lambda *s: torch.randn(*s, generator=g) * 0.3  # noqa: E731
    layouts = {  # module: (factors, alpha, scale LyCORIS applies)
        "blocks.0.self_attn.q": ({"lokr_w1": r(4, 4), "lokr_w2_a": r(16, 2), "lokr_w2_b": r(2, 16)}, 1.0, 1 / 2),
        "blocks.1.ffn.0": ({"lokr_w1_a": r(8, 2), "lokr_w1_b": r(2, 4), "lokr_w2": r(16, 16)}, 3.0, 3 / 2),
        "blocks.0.ffn.2": ({"lokr_w1": r(8, 8), "lokr_w2": r(8, 16)}, 5.0, 1.0),  # alpha unused
    }
    sd, dense = {}, {}
    for m, (f, alpha, scale) in layouts.items():
        sd.update({f"diffusion_model.{m}.{k}": v for k, v in f.items()})
        sd[f"diffusion_model.{m}.alpha"] = torch.tensor(alpha)
        w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
        w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
        dense[m] = torch.kron(w1, w2) * scale
    return sd, dense


def test_lokr(base, tmp_path):
    sd, dense = _lokr_sd(base)
    path = write(sd, tmp_path / "lokr.safetensors")
    ref = copy.deepcopy(base[1])
    for m, delta in dense.items():
        add_to_diffusers(ref, f"{m}.weight", STRENGTH * delta)
    report = _compare(base, path, ref, "LoKr")
    assert report.format == "comfy + LoKr" and report.experts[0].modules == 3


@pytest.mark.parametrize("fmt", ["kohya", "comfy", "lightx2v", "loha", "lokr"])
def test_live_mode_matches_diffusers(base, tmp_path, fmt):
    """Unmerged application (live forward on the block Linears) against the same references."""
    if fmt == "kohya":
        truth = _kohya_truth(base)
        path = write(kohya_sd(truth), tmp_path / "k.safetensors")
        ref = _diffusers_with(base, path)
    elif fmt == "comfy":
        path = write(comfy_sd(_comfy_truth(base)), tmp_path / "c.safetensors")
        ref = _diffusers_with(base, path)
    elif fmt == "lightx2v":
        truth = _lightx2v_truth(base)
        path = write(comfy_sd(truth), tmp_path / "l.safetensors")
        ref = _diffusers_with(base, path)
        for name, delta in truth.diffs.items():
            if any(s in name for s in DIFFUSERS_SKIPS):
                add_to_diffusers(ref, name, STRENGTH * delta)
    else:
        sd, dense = _loha_sd(base, block_linears(2)) if fmt == "loha" else _lokr_sd(base)
        path = write(sd, tmp_path / f"{fmt}.safetensors")
        ref = copy.deepcopy(base[1])
        for m, delta in dense.items():
            add_to_diffusers(ref, f"{m}.weight", STRENGTH * delta)
    report = _compare(base, path, ref, f"{fmt} live", mode="live")
    assert report.experts[0].layers_live > 0
