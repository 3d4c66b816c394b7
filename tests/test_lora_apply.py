"""LoraStack behaviour: fuse == live, exact unload, stacking, expert selection, coverage reports,
and bad files refused with a clear message before any weight changes."""

from __future__ import annotations

import hashlib

import pytest
import torch

import torch.nn as nn
import torch.nn.functional as F

from wanx.lora import LoraError, LoraStack
from wanx.lora.live import LiveLinear

from helpers_lora import (assert_bit_identical, make_experts, make_inputs, rel_err, rich_lora, run_wanx,
                          snapshot, write)

# ------------------------------------------------------------------------------------ modes

@pytest.mark.parametrize("policy", ["auto", "low_rank", "merged"])
def test_fuse_and_live_agree(tmp_path, monkeypatch, policy):
    monkeypatch.setattr(LiveLinear, "policy", policy)
    experts = make_experts()
    _, path = rich_lora(experts[0], tmp_path)
    inputs = make_inputs(experts[0].cfg)
    base = [run_wanx(m, inputs) for m in experts]
    outs = {}
    for mode in ("fuse", "live"):
        stack = LoraStack(experts)
        report = stack.load(path, strength=(0.7, 1.3), mode=mode)
        outs[mode] = [run_wanx(m, inputs) for m in experts]
        stack.unload_all()
        assert report.experts[0].layers_live == (20 if mode == "live" else 0)
    for i, expert in enumerate(("high", "low")):
        err = rel_err(outs["live"][i], outs["fuse"][i])
        effect = rel_err(outs["fuse"][i], base[i])
        print(f"{expert}, live path {policy}: fuse vs live rel err {err:.2e} (LoRA effect {effect:.2e})")
        assert effect > 1e-2 and err <= 1e-5


def test_live_mode_with_autograd_matches_inference(tmp_path):
    (model,) = make_experts()[:1]
    _, path = rich_lora(model, tmp_path)
    inputs = make_inputs(model.cfg)
    stack = LoraStack((model,))
    stack.load(path, mode="live")
    no_grad = run_wanx(model, inputs)
    x, t, ctx = inputs
    with torch.enable_grad():
        with_grad = model(x, t, ctx)
    assert with_grad.requires_grad
    err = rel_err(with_grad.detach(), no_grad)
    print(f"live, grad vs no-grad: rel err {err:.2e}")
    assert err <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("modes", [("fuse",), ("live",), ("fuse", "live", "fuse")])
def test_unload_restores_exact_weights(tmp_path, dtype, modes):
    experts = make_experts(dtype=dtype)
    snap = snapshot(*experts)
    stack = LoraStack(experts)
    for i, mode in enumerate(modes):
        _, path = rich_lora(experts[0], tmp_path, f"l{i}.safetensors", seed=10 + i)
        stack.load(path, strength=0.9 + i, mode=mode)
    assert any(not torch.equal(experts[0].state_dict()[k], v) for k, v in snap[0].items())
    inputs = make_inputs(experts[0].cfg)
    with_lora = run_wanx(experts[0], inputs)
    stack.unload_all()
    assert_bit_identical(experts, snap)
    assert stack.applied == ()
    # Hooks are gone too: the output is the base output again, bit for bit.
    fresh = make_experts(dtype=dtype)[0]
    assert torch.equal(run_wanx(experts[0], inputs), run_wanx(fresh, inputs))
    assert not torch.equal(with_lora, run_wanx(fresh, inputs))


@pytest.mark.parametrize("mode", ["fuse", "live"])
def test_two_stacked_loras_are_their_sum(tmp_path, mode):
    (model,) = make_experts()[:1]
    inputs = make_inputs(model.cfg)
    a, path_a = rich_lora(model, tmp_path, "a.safetensors", seed=3)
    b, path_b = rich_lora(model, tmp_path, "b.safetensors", seed=4)
    # The reference: one model whose weights get s_a * dA + s_b * dB added by hand.
    manual = make_experts()[0]
    with torch.no_grad():
        for truth, s in ((a, 0.6), (b, -1.2)):
            for m in truth.pairs:
                manual.get_parameter(f"{m}.weight").add_(s * truth.dense(m))
            for p, d in truth.diffs.items():
                manual.get_parameter(p).add_(s * d)
    stack = LoraStack((model,))
    stack.load(path_a, strength=0.6, mode=mode)
    stack.load(path_b, strength=-1.2, mode=mode)
    err = rel_err(run_wanx(model, inputs), run_wanx(manual, inputs))
    print(f"{mode}: two stacked LoRAs vs hand sum of deltas: rel err {err:.2e}")
    assert err <= 1e-5
    assert [r.name for r in stack.applied] == ["a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("policy", ["merged", "low_rank"])
def test_live_bias_only_delta_leaves_weights_alone(tmp_path, monkeypatch, policy):
    """A live LoRA that only shifts a bias, stacked under one with pairs on the same layers."""
    monkeypatch.setattr(LiveLinear, "policy", policy)
    live, fused = make_experts()[0], make_experts()[0]
    g = torch.Generator().manual_seed(9)
    biases = {f"diffusion_model.blocks.{i}.ffn.{j}.diff_b":
              0.1 * torch.randn(live.blocks[i].ffn[j].bias.shape, generator=g) for i in range(2) for j in (0, 2)}
    first = write(biases, tmp_path / "biases.safetensors")
    _, second = rich_lora(live, tmp_path)
    snap = snapshot(live)
    for model, mode in ((live, "live"), (fused, "fuse")):
        stack = LoraStack((model,))
        stack.load(first, strength=0.7, mode=mode)
        stack.load(second, strength=1.1, mode=mode)
    inputs = make_inputs(live.cfg)
    err = rel_err(run_wanx(live, inputs), run_wanx(fused, inputs))
    print(f"bias-only + pair LoRAs, live ({policy}) vs fuse: rel err {err:.2e}")
    assert err <= 1e-5
    block_weights = [k for k in snap[0] if k.startswith("blocks.") and ".ffn." in k]
    assert all(torch.equal(live.state_dict()[k], snap[0][k]) for k in block_weights)


# ------------------------------------------------------------------------------------ experts

def test_one_expert_only_and_records(tmp_path):
    experts = make_experts()
    snap = snapshot(*experts)
    _, path = rich_lora(experts[0], tmp_path)
    stack = LoraStack(experts)
    report = stack.load(path, strength=0.5, expert="low", mode="live")
    assert [c.expert for c in report.experts] == ["low"]
    assert_bit_identical(experts[:1], snap[:1])
    inputs = make_inputs(experts[0].cfg)
    before_high = run_wanx(make_experts()[0], inputs)
    assert torch.equal(run_wanx(experts[0], inputs), before_high)  # nothing live on the high expert
    (rec,) = stack.applied
    assert rec.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert rec.to_dict() == {"name": "rich.safetensors", "sha256": rec.sha256, "strength": 0.5,
                             "expert": "low", "mode": "live", "format": "lightx2v"}


def test_single_expert_refuses_high_low(tmp_path):
    (model,) = make_experts()[:1]
    _, path = rich_lora(model, tmp_path)
    with pytest.raises(LoraError, match="single expert"):
        LoraStack((model,)).load(path, expert="high")
    with pytest.raises(LoraError, match="two experts"):
        LoraStack((model,)).load(path, strength=(1.0, 2.0))
    with pytest.raises(LoraError, match="mode"):
        LoraStack((model,)).load(path, mode="merge")


def test_same_model_twice_is_patched_once(tmp_path):
    (model,) = make_experts()[:1]
    truth, path = rich_lora(model, tmp_path)
    once = make_experts()[0]
    LoraStack((once,)).load(path)
    LoraStack((model, model)).load(path)
    assert_bit_identical([model], snapshot(once))


def test_live_chooses_the_cheaper_formula():
    layer = LiveLinear(nn.Linear(64, 128))
    assert not layer._merges(42) and layer._merges(43)  # N (64 + 128) > 64 * 128 from N = 43
    layer.layer.weight = nn.Parameter(layer.layer.weight.detach().to(torch.int8), requires_grad=False)
    assert not layer._merges(10_000)  # never merge into a non-float (quantized) weight


class Int8Linear(nn.Module):
    """A stand-in for a quantized layer: int8 weight, per-row scale, dequantized on the fly."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
        self.weight = nn.Parameter((linear.weight.detach() / scale).round().to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale, self.bias)


def test_live_on_a_quantized_layer(tmp_path):
    # Layers whose input dtype dit.py does not take from their own weight (it casts the FFN input
    # to ffn.0's dtype and the attention input to q's).
    names = ("blocks.0.ffn.2", "blocks.1.self_attn.v")
    quantized, reference = make_experts()
    reference.load_state_dict(quantized.state_dict())
    for name in names:
        parent, child = name.rsplit(".", 1)
        q = Int8Linear(quantized.get_submodule(name))
        setattr(quantized.get_submodule(parent), child, q)  # also right for Sequential's "2"
        with torch.no_grad():  # the float twin holds exactly the dequantized weight
            reference.get_parameter(f"{name}.weight").copy_(q.weight.float() * q.scale)
    _, path = rich_lora(reference, tmp_path)
    snap = snapshot(quantized)
    with pytest.raises(LoraError, match="cannot fuse into the torch.int8 parameter .*use mode='live'"):
        LoraStack((quantized,)).load(path, mode="fuse")
    assert_bit_identical([quantized], snap)
    LoraStack((quantized,)).load(path, mode="live")
    LoraStack((reference,)).load(path, mode="fuse")
    inputs = make_inputs(reference.cfg)
    err = rel_err(run_wanx(quantized, inputs), run_wanx(reference, inputs))
    print(f"live LoRA on int8 layers vs fused on their float twin: rel err {err:.2e}")
    assert err <= 1e-5
    assert torch.equal(quantized.get_parameter("blocks.0.ffn.2.weight"), snap[0]["blocks.0.ffn.2.weight"])
