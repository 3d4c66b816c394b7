"""WanDiT: parity with diffusers (and the official code when present), invariants, sizes, RoPE."""

import importlib.util
import math
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from wanx.configs import TASKS, DiTConfig
from wanx.loading.dit import diffusers_to_official
from wanx.model import WanDiT, attention, attention_backend
from wanx.model.dit import sinusoidal_embedding
from wanx.model.rope import RopeCache, apply_rope_c64, rope_freqs, rope_split, rope_tables

GRID = (3, 8, 8)  # latent T, H, W -> 3 x 4 x 4 = 48 tokens
NUM_TOKENS = 48
CTX_LEN = 7  # shorter than text_len: exercises the zero padding


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def randomize_(module: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter (zero-init ones included) a nonzero random value of sensible scale."""
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


def make_inputs(cfg: DiTConfig, batch: int = 1, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    x_ch = 16 if cfg.model_type == "i2v" else cfg.in_dim
    x = torch.randn(batch, x_ch, *GRID, generator=g)
    y = torch.randn(batch, cfg.in_dim - x_ch, *GRID, generator=g) if cfg.model_type == "i2v" else None
    ctx = torch.randn(batch, CTX_LEN, cfg.text_dim, generator=g)
    if cfg.model_type == "ti2v":
        t = torch.full((batch, NUM_TOKENS), 937.0)
        t[:, : NUM_TOKENS // GRID[0]] = 0.0  # first-frame tokens at t=0 (TI2V image-to-video)
    else:
        t = torch.full((batch,), 937.0)
    return x, t, ctx, y


def tiny_model(model_type: str = "t2v", seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    m = WanDiT(DiTConfig.tiny(model_type)).eval()
    randomize_(m, seed + 1)
    return m


# ------------------------------------------------------------------------------------------- structure

def expected_official_keys(num_layers: int) -> set[str]:
    """The official WanModel key list (spec §3.5)."""
    keys = {"patch_embedding.weight", "patch_embedding.bias", "time_projection.1.weight",
            "time_projection.1.bias", "head.modulation", "head.head.weight", "head.head.bias"}
    keys |= {f"{m}.{i}.{p}" for m in ("text_embedding", "time_embedding") for i in (0, 2) for p in ("weight", "bias")}
    for i in range(num_layers):
        b = f"blocks.{i}."
        keys |= {b + "modulation", b + "norm3.weight", b + "norm3.bias"}
        keys |= {f"{b}ffn.{j}.{p}" for j in (0, 2) for p in ("weight", "bias")}
        for a in ("self_attn", "cross_attn"):
            keys |= {f"{b}{a}.{l}.{p}" for l in "qkvo" for p in ("weight", "bias")}
            keys |= {f"{b}{a}.norm_q.weight", f"{b}{a}.norm_k.weight"}
    return keys


@pytest.mark.parametrize("task, billions, num_keys", [
    ("t2v-A14B", 14.29, 1095), ("i2v-A14B", 14.29, 1095), ("ti2v-5B", 5.00, 825)])
def test_full_size_parameter_counts_on_meta(task, billions, num_keys):
    cfg = TASKS[task].dit
    with torch.device("meta"):
        model = WanDiT(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"{task}: {n / 1e9:.4f} B parameters")
    assert abs(n / 1e9 - billions) < 0.01
    sd = model.state_dict()
    assert len(sd) == num_keys and set(sd) == expected_official_keys(cfg.num_layers)
    assert tuple(sd["head.head.weight"].shape) == (4 * cfg.out_dim, cfg.dim)
    assert tuple(sd["patch_embedding.weight"].shape) == (cfg.dim, cfg.in_dim, 1, 2, 2)


def test_no_rope_tables_or_buffers_in_state_dict():
    m = tiny_model()
    m(*make_inputs(m.cfg)[:3])
    assert len(m.rope) == 1  # a table was built and cached ...
    assert not list(m.buffers()) and set(m.state_dict()) == expected_official_keys(2)  # ... but is not state


# ---------------------------------------------------------------------------------------------- parity

def diffusers_twin(cfg: DiTConfig):
    """A diffusers WanTransformer3DModel of the same size, every parameter random, and our copy of it."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps).eval()
    randomize_(ref)
    ours = WanDiT(cfg).eval()
    ours.load_state_dict(diffusers_to_official(ref.state_dict()), strict=True)
    return ref, ours


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_parity_with_diffusers(model_type):
    pytest.importorskip("diffusers")
    cfg = DiTConfig.tiny(model_type)
    ref, ours = diffusers_twin(cfg)
    x, t, ctx, y = make_inputs(cfg)
    with torch.no_grad():
        out = ours(x, t, ctx, y=y)
        x_ref = x if y is None else torch.cat([x, y], dim=1)
        ctx_ref = F.pad(ctx, (0, 0, 0, cfg.text_len - CTX_LEN))  # diffusers expects the padded context
        expected = ref(x_ref, t, ctx_ref, return_dict=False)[0]
    err = rel_err(out, expected)
    print(f"{model_type}: max rel err vs diffusers = {err:.2e}")
    assert out.shape == expected.shape == (1, cfg.out_dim, *GRID) and out.dtype == torch.float32
    assert expected.abs().max() > 0.1 and out.abs().max() > 0.1
    assert err <= 1e-5


# The official `wan` package, unpacked from the wan22 wheel by `scripts/setup.sh all` (make test).
OFFICIAL_SRC_DEFAULT = Path(__file__).resolve().parents[1] / ".venv" / "reference" / "wan"


def _load_official_model_module():
    """wan/modules/model.py from the official source tree (WANX_OFFICIAL_SRC), without its package init."""
    src = Path(os.environ.get("WANX_OFFICIAL_SRC", OFFICIAL_SRC_DEFAULT)) / "modules"
    if not (src / "model.py").is_file():
        message = f"official Wan source not found at {src} (`bash scripts/setup.sh all` fetches it)"
        if os.environ.get("CI"):  # CI's set-up fetches it: a missing reference there is a failure
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("diffusers")
    pkg = types.ModuleType("_wan_official")
    pkg.__path__ = [str(src)]
    sys.modules.setdefault("_wan_official", pkg)
    for name in ("attention", "model"):
        full = f"_wan_official.{name}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, src / f"{name}.py")
            mod = importlib.util.module_from_spec(spec)
            sys.modules[full] = mod
            spec.loader.exec_module(mod)
    return sys.modules["_wan_official.model"]


def _key_bias(k_lens, num_keys):
    """``[B, 1, 1, Lk]``: 0 for the first ``k_lens[b]`` keys of sample b, -inf (masked) after them."""
    if k_lens is None:
        return None
    keep = torch.arange(num_keys, device=k_lens.device)[None, :] < k_lens[:, None]  # [B, Lk]
    return torch.where(keep, 0.0, float("-inf"))[:, None, None, :]


def official_twin(model_type, monkeypatch):
    """The official WanModel with random weights, our copy of it, and inputs (t padded as the official pipeline)."""
    official = _load_official_model_module()
    # The official attention is CUDA flash-attn only; give it ours, its k_lens as a -inf key bias.
    monkeypatch.setattr(official, "flash_attention",
                        lambda q, k, v, k_lens=None, **kw: attention(q, k, v, bias=_key_bias(k_lens, k.shape[1])))
    cfg = DiTConfig.tiny(model_type)
    torch.manual_seed(0)
    ref = official.WanModel(**cfg.to_dict()).eval()
    randomize_(ref)
    ours = WanDiT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x, t, ctx, y = make_inputs(cfg)
    t_off = torch.cat([t.expand(1, NUM_TOKENS), t.new_full((1, 5), 937.0)], dim=1)  # padded to seq_len
    return ref, ours, (x, t, ctx, y), t_off


def run_official(ref, x, t_off, ctx, y):
    # seq_len > tokens: the official pads the token sequence and masks the padded keys.
    return ref([x[0]], t_off, [ctx[0]], seq_len=NUM_TOKENS + 5, y=None if y is None else [y[0]])[0]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("model_type", ["t2v", "i2v", "ti2v"])
def test_parity_with_official_code(model_type, monkeypatch):
    ref, ours, (x, t, ctx, y), t_off = official_twin(model_type, monkeypatch)
    with torch.no_grad(), attention_backend("math"):
        out = ours(x, t, ctx, y=y)
        expected = run_official(ref, x, t_off, ctx, y)
    err = rel_err(out[0], expected)
    print(f"{model_type}: max rel err vs official = {err:.2e}")
    assert expected.abs().max() > 0.1 and err <= 2e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the official autocast regions are CUDA-only)")
@pytest.mark.parametrize("model_type", ["t2v", "ti2v"])
def test_bf16_parity_with_official_autocast(model_type, monkeypatch):
    """Official --convert_model_dtype (bf16 weights under bf16 autocast) vs ours with bf16 weights."""
    ref, ours, inputs, t_off = official_twin(model_type, monkeypatch)
    x, t, ctx, y = (None if v is None else v.cuda() for v in inputs)
    ref.to("cuda", torch.bfloat16)
    ours.to("cuda", torch.bfloat16)
    with torch.no_grad():
        out = ours(x, t, ctx, y=y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            expected = run_official(ref, x, t_off.cuda(), ctx, y).float()
    err = rel_err(out[0], expected)
    print(f"{model_type}: bf16 max rel err vs official autocast = {err:.2e}")
    assert err <= 1e-2


# ------------------------------------------------------------------------------------------ invariants

@pytest.mark.parametrize("model_type", ["t2v", "ti2v"])
def test_batch_of_two_equals_two_batches_of_one(model_type):
    m = tiny_model(model_type)
    x, t, ctx, y = make_inputs(m.cfg, batch=2)
    t = t.clone()
    t[1] = t[1] * 0.5  # different timesteps per sample
    with torch.no_grad():
        both = m(x, t, ctx, y=y)
        singles = torch.cat([m(x[i:i + 1], t[i:i + 1], ctx[i:i + 1]) for i in range(2)])
    assert rel_err(both[1], both[0]) > 1e-2  # the two samples really differ
    assert rel_err(both, singles) <= 1e-5


def test_timestep_forms_agree():
    m = tiny_model()
    x, t, ctx, _ = make_inputs(m.cfg, batch=2)
    t = torch.tensor([937.0, 500.0])
    with torch.no_grad():
        per_sample = m(x, t, ctx)
        per_token = m(x, t[:, None].expand(2, NUM_TOKENS), ctx)
        padded = m(x, t[:, None].expand(2, NUM_TOKENS + 7), ctx)  # official-style seq_len padding
        scalar = m(x[:1], 937.0, ctx[:1])
    assert rel_err(per_sample, per_token) <= 1e-5  # same numbers up to matmul-shape rounding
    assert torch.equal(per_token, padded)
    assert rel_err(scalar, per_sample[:1]) <= 1e-5
    with pytest.raises(ValueError, match="t must be"):
        m(x, torch.ones(2, NUM_TOKENS - 1), ctx)


def test_per_token_timesteps_change_only_through_modulation():
    m = tiny_model("ti2v")
    x, t, ctx, _ = make_inputs(m.cfg)
    with torch.no_grad():
        a = m(x, t, ctx)
        b = m(x, torch.full_like(t, 937.0), ctx)
    assert rel_err(a, b) > 1e-3  # first-frame t=0 tokens matter


def test_context_padding_is_zero_padding():
    m = tiny_model()
    x, t, ctx, _ = make_inputs(m.cfg)
    with torch.no_grad():
        short = m(x, t, ctx)
        long = m(x, t, F.pad(ctx, (0, 0, 0, 20)))
    assert torch.equal(short, long)
    with pytest.raises(ValueError, match="context must be"):
        m(x, t, torch.zeros(1, m.cfg.text_len + 1, m.cfg.text_dim))


def test_attention_backend_choice_reaches_the_model():
    m = tiny_model()
    x, t, ctx, _ = make_inputs(m.cfg)
    with torch.no_grad():
        sdpa = m(x, t, ctx)
        with attention_backend("math"):
            ref = m(x, t, ctx)
    assert rel_err(sdpa, ref) <= 1e-5


def test_bfloat16_weights_keep_fp32_residual_and_output():
    m = tiny_model("ti2v")
    x, t, ctx, _ = make_inputs(m.cfg)
    with torch.no_grad():
        ref = m(x, t, ctx)
        m.to(torch.bfloat16)
        dtypes = []
        hook = m.blocks[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
        out = m(x, t, ctx)
        hook.remove()
    assert m.blocks[0].self_attn.q.weight.dtype == torch.bfloat16
    assert dtypes == [torch.float32] and out.dtype == torch.float32
    err = rel_err(out, ref)
    print(f"bf16 weights vs fp32: rel err {err:.2e}")
    assert 0 < err < 5e-2


def test_input_validation():
    m = tiny_model("i2v")
    x, t, ctx, y = make_inputs(m.cfg)
    with pytest.raises(ValueError, match="36 input channels"):
        m(x, t, ctx)  # i2v without y
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.cat([x, y], 1)[..., :7], t, ctx)


def test_unpatchify_matches_official_layout():
    cfg = DiTConfig.tiny("t2v", patch_size=(1, 2, 2))
    with torch.device("meta"):
        m = WanDiT(cfg)
    f, h, w, c = 2, 3, 4, cfg.out_dim
    tokens = torch.randn(2, f * h * w, 4 * c)
    out = m.unpatchify(tokens, (f, h, w))
    for b in range(2):  # official: view(f,h,w,p,q,r,c) -> einsum fhwpqrc->cfphqwr -> reshape
        u = torch.einsum("fhwpqrc->cfphqwr", tokens[b].view(f, h, w, 1, 2, 2, c))
        assert torch.equal(out[b], u.reshape(c, f, 2 * h, 2 * w))


def test_sinusoidal_embedding_is_cos_then_sin_in_float64():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = sinusoidal_embedding(t, 256)
    assert emb.dtype == torch.float32 and emb.shape == (3, 256)
    assert torch.equal(emb[0, :128], torch.ones(128)) and torch.equal(emb[0, 128:], torch.zeros(128))
    angles = 999.0 * 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
    assert torch.equal(emb[2], torch.cat([angles.cos(), angles.sin()]).float())


# ------------------------------------------------------------------------------------------------ RoPE

def test_rope_split():
    assert rope_split(128) == (22, 21, 21)  # 44 : 42 : 42 channels
    assert rope_split(32) == (6, 5, 5)


def test_rope_matches_real_rotation_of_adjacent_pairs():
    head_dim, grid = 32, (2, 3, 4)
    x = torch.randn(1, 24, 2, head_dim, generator=torch.Generator().manual_seed(0))
    out = apply_rope_c64(x, rope_tables(grid, head_dim))  # complex64: a few ulp from the float64 formula
    ct, ch, cw = rope_split(head_dim)
    pos = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(-1, 3)
    inv = [10000.0 ** (-torch.arange(0, 2 * c, 2, dtype=torch.float64) / (2 * c)) for c in (ct, ch, cw)]
    angle = torch.cat([pos[:, a:a + 1].double() * inv[a][None] for a in range(3)], dim=1)  # [L, D/2]
    x0, x1 = x[..., 0::2].double(), x[..., 1::2].double()
    cos, sin = angle.cos()[None, :, None], angle.sin()[None, :, None]
    expected = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2).float()
    assert out.dtype == torch.float32 and torch.allclose(out, expected, rtol=0, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 32
    table = rope_tables((4, 4, 4), head_dim)  # tokens in (t, h, w) row-major order
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(i, j):
        qi = apply_rope_c64(q, table[i:i + 1]).double()
        kj = apply_rope_c64(k, table[j:j + 1]).double()
        return (qi * kj).sum().item()

    idx = lambda f, h, w: (f * 4 + h) * 4 + w  # noqa: E731
    assert math.isclose(score(idx(0, 1, 2), idx(1, 2, 0)), score(idx(2, 0, 3), idx(3, 1, 1)), rel_tol=1e-5)
    assert not math.isclose(score(idx(0, 0, 0), idx(1, 0, 0)), score(idx(0, 0, 0), idx(0, 1, 0)), rel_tol=1e-3)


def test_rope_cache_is_bounded_and_explicit():
    cache = RopeCache(32, max_entries=2)
    a = cache((1, 2, 2), "cpu")
    assert cache((1, 2, 2), "cpu") is a and len(cache) == 1
    cache((2, 2, 2), "cpu")
    cache((3, 2, 2), "cpu")
    assert len(cache) == 2 and cache((1, 2, 2), "cpu") is not a
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="1024"):
        rope_freqs((1025, 1, 1), 32)


def test_batched_forward_path_equals_per_sample():
    """On CPU big inference batches run sample by sample; the truly batched path must agree."""
    torch.manual_seed(0)
    model = WanDiT(DiTConfig.tiny("t2v")).eval()
    x = torch.randn(2, 16, 2, 8, 8)
    t = torch.tensor([900, 300])
    ctx = torch.randn(2, 7, 32)
    with torch.no_grad():
        model.cpu_sample_by_sample = True
        per_sample = model(x, t, ctx)
        model.cpu_sample_by_sample = False
        batched = model(x, t, ctx)
    err = ((batched - per_sample).abs().max() / per_sample.abs().max()).item()
    print(f"batched vs per-sample forward: max rel err {err:.2e}")
    assert err <= 1e-5


def test_auto_sample_by_sample_splits_only_big_inference_batches():
    """"auto": training batches and small token counts stay batched (per-op overhead dominates);
    inference batches whose per-sample FFN hidden state is big run one sample per pass."""
    model = WanDiT(DiTConfig.tiny("t2v"))
    assert model.cpu_sample_by_sample == "auto"
    small = torch.empty(2, 16, 2, 8, 8)
    per_sample_bytes = model.cfg.ffn_dim * 4
    tokens_needed = -(-model.SPLIT_BATCH_BYTES // per_sample_bytes)
    pt, ph, pw = model.cfg.patch_size
    big = torch.empty(2, 16, pt, ph, pw * tokens_needed)
    with torch.no_grad():
        assert not model._runs_sample_by_sample(small)
        assert model._runs_sample_by_sample(big)
        assert not model._runs_sample_by_sample(big[:1])
    assert not model._runs_sample_by_sample(big)  # grad enabled: training keeps the batch
    model.cpu_sample_by_sample = True
    assert model._runs_sample_by_sample(small)
    model.cpu_sample_by_sample = False
    with torch.no_grad():
        assert not model._runs_sample_by_sample(big)


def test_compiled_blocks_match_eager():
    """``compile_blocks`` (torch.compile, inductor) changes speed, not results: fp32 rel err <= 1e-5."""
    torch.manual_seed(0)
    cfg = DiTConfig.tiny("t2v").replace(num_layers=2)
    eager = WanDiT(cfg).eval()
    compiled = WanDiT(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    assert list(compiled.state_dict()) == list(eager.state_dict())  # keys survive compiling
    x, t, ctx = torch.randn(1, 16, 2, 8, 8), torch.tensor([700.0]), torch.randn(1, 7, 32)
    with torch.no_grad():
        want, got = eager(x, t, ctx), compiled(x, t, ctx)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(f"compiled vs eager blocks: max rel err {err:.2e}")
    assert err <= 1e-5


def test_real_arithmetic_rope_equals_complex64_rope():
    """The form used under torch.compile rotates exactly like the complex64 eager form."""
    from wanx.model.rope import _rotate_real, apply_rope_c64, rope_tables

    grid = (3, 4, 5)
    x = torch.randn(2, 60, 4, 32)
    table = rope_tables(grid, 32)
    want, got = apply_rope_c64(x, table), _rotate_real(x, table)
    err = ((got - want).abs().max() / x.abs().max()).item()
    print(f"real vs complex64 RoPE: max err {err:.2e} of max |x|")
    assert err <= 1e-6
