"""One denoising step with classifier-free guidance: wanx WanDiT vs diffusers WanTransformer3DModel.

wanx runs the step the way its pipeline does (``wanx.pipelines.denoise.guided_velocity``: cond and uncond batched in one
forward); diffusers the way ``diffusers.WanPipeline`` does (two forwards, contexts zero-padded to
512). Both hold the very same weight tensors: the diffusers model is built on the meta device and
the wanx state dict, renamed by ``official_to_diffusers``, is assigned into it (no copy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from wanx.configs import DiTConfig, get_task
from wanx.loading.dit import official_to_diffusers
from wanx.model import WanDiT

from .common import Size, interleaved, measure_call_memory, peak_memory, randomize_, rel_err, summarize

GUIDE = 5.0
T_STEP = 937.0


def diffusers_config(cfg: DiTConfig) -> dict[str, Any]:
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, eps=cfg.eps)


def build_wanx(size: Size, device: str) -> WanDiT:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = WanDiT(size.dit)
    model = model.to_empty(device=device).to(size.dtype).eval()
    randomize_(model, seed=1)  # same values on CPU runs; on CUDA drawn there, in place
    return model


def build_diffusers_sharing(model: WanDiT):
    """A diffusers twin whose parameters ARE the wanx tensors (renamed keys, assign=True)."""
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        ref = WanTransformer3DModel(**diffusers_config(model.cfg))
    sd = official_to_diffusers(model.state_dict())
    ref.load_state_dict(sd, strict=False, assign=True)
    # The RoPE tables are non-persistent buffers: rebuild them for real (float64, as diffusers does).
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    rope = ref.rope
    ref.rope = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    missing = [k for k, v in ref.state_dict().items() if v.is_meta]
    if missing:
        raise RuntimeError(f"diffusers twin has unassigned tensors: {missing[:5]}")
    return ref.to(next(model.parameters()).device).eval()


def build_diffusers_alone(size: Size, device: str):
    """For memory probes: the diffusers twin alone (it holds the only references to the weights)."""
    return build_diffusers_sharing(build_wanx(size, device))


def make_inputs(size: Size, device: str, seed: int = 2):
    """latent [1, C, T, H, W] fp32, t [1], prompt/negative contexts [1, L_i, text_dim] (trimmed)."""
    g = torch.Generator().manual_seed(seed)
    cfg = size.dit
    latent = torch.randn(1, cfg.in_dim, *size.latent, generator=g)
    ctx = torch.randn(1, size.ctx_lens[0], cfg.text_dim, generator=g)
    ctx_null = torch.randn(1, size.ctx_lens[1], cfg.text_dim, generator=g)
    t = torch.tensor([T_STEP])
    if cfg.model_type == "ti2v":
        t = t[:, None].expand(1, size.tokens).contiguous()  # per-token timesteps (TI2V)
    dt = size.dtype
    return latent.to(device), t.to(device), ctx.to(device, dt), ctx_null.to(device, dt)


def wanx_step(model: WanDiT):
    """The wanx pipeline's own guided prediction (batched CFG, prompt lengths passed along)."""
    from wanx.pipelines.denoise import guided_velocity
    from wanx.text import TextContext

    def step(latent, t, ctx, ctx_null):
        cond = TextContext(ctx, torch.tensor([ctx.shape[1]]))
        uncond = TextContext(ctx_null, torch.tensor([ctx_null.shape[1]]))
        with torch.no_grad():
            return guided_velocity(model, latent, t, cond, uncond, GUIDE, batch_cfg=True)
    return step


def diffusers_step(ref, text_len: int):
    """diffusers.WanPipeline's step: two forwards on 512-padded contexts, guidance in fp32."""
    def step(latent, t, ctx, ctx_null):
        pad = lambda c: F.pad(c, (0, 0, 0, text_len - c.shape[1]))  # noqa: E731
        dtype = ref.dtype
        with torch.no_grad():
            cond = ref(hidden_states=latent.to(dtype), timestep=t, encoder_hidden_states=pad(ctx),
                       return_dict=False)[0]
            uncond = ref(hidden_states=latent.to(dtype), timestep=t, encoder_hidden_states=pad(ctx_null),
                         return_dict=False)[0]
        return uncond.float() + GUIDE * (cond.float() - uncond.float())
    return step


def count_flops(cfg: DiTConfig, tokens: int, ctx_len: int | None = None, batch: int = 2) -> float:
    """Matmul FLOPs (2 per multiply-add) of one guided step = ``batch`` forwards, dense as the official.

    Counts: patch embedding, text embedding, per block the self-attention projections (q, k, v, o),
    QK^T and PV, the cross-attention projections (q, o on video tokens; k, v on the text), its QK^T
    and PV, the FFN, and the head. Elementwise work (norms, RoPE, softmax, GELU) is not counted.
    ``ctx_len`` is the number of text rows each forward processes (default: all ``text_len``).
    """
    L, d, f = tokens, cfg.dim, cfg.ffn_dim
    lc = cfg.text_len if ctx_len is None else ctx_len
    p = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    per_block = (4 * L * d * d  # self q, k, v, o
                 + 2 * L * L * d  # self QK^T and PV
                 + 2 * L * d * d + 2 * lc * d * d  # cross q, o (video) and k, v (text)
                 + 2 * L * lc * d  # cross QK^T and PV
                 + 2 * L * d * f)  # FFN
    macs = (cfg.num_layers * per_block + L * cfg.in_dim * p * d + lc * (cfg.text_dim * d + d * d)
            + L * d * cfg.out_dim * p)
    return 2.0 * macs * batch


def flop_counts(size: Size) -> dict[str, Any]:
    """Matmul FLOPs of one guided step as each side runs it, and their ratio (the "FLOP floor").

    diffusers processes all ``text_len`` (512) text rows in both forwards; wanx folds each context's
    zero padding into one key (``WanDiT.embed_text``), i.e. real length + 1 rows. At equal FLOP/s
    wanx/diffusers time cannot go below ``flop_floor_ratio`` without changing the numbers.
    """
    cfg = size.dit
    compacts = size.dtype == torch.float32  # as WanDiT._can_compact_text: fp32 weights only
    text_rows = [min(n + 1, cfg.text_len) if compacts else cfg.text_len for n in size.ctx_lens]
    wanx = sum(count_flops(cfg, size.tokens, ctx_len=n, batch=1) for n in text_rows)
    ref = count_flops(cfg, size.tokens)
    return {"flops_per_step": {"wanx": wanx, "ref": ref}, "flop_floor_ratio": wanx / ref}


def compiled_twin(model: WanDiT) -> WanDiT:
    """A second WanDiT on the same weight tensors with ``compile_blocks()`` applied."""
    with torch.device("meta"):
        twin = WanDiT(model.cfg)
    twin.load_state_dict(model.state_dict(), strict=True, assign=True)
    return twin.eval().compile_blocks()


def run(size: Size, repeats: int, device: str, mem: bool, compile: bool = False) -> list[dict[str, Any]]:
    model = build_wanx(size, device)
    ref = build_diffusers_sharing(model)
    latent, t, ctx, ctx_null = make_inputs(size, device)
    ours, theirs = wanx_step(model), diffusers_step(ref, size.dit.text_len)
    a, b = ours(latent, t, ctx, ctx_null), theirs(latent, t, ctx, ctx_null)
    err = rel_err(a, b)
    fns = {"wanx": lambda: ours(latent, t, ctx, ctx_null), "ref": lambda: theirs(latent, t, ctx, ctx_null)}
    compiled_diffs = []  # (timed name, rel diff vs diffusers)
    if compile:  # timed in the same interleaved run; its first call (compilation) is not timed
        compiled = wanx_step(compiled_twin(model))
        out = compiled(latent, t, ctx, ctx_null)
        fns["wanx+compile"] = lambda: compiled(latent, t, ctx, ctx_null)
        compiled_diffs.append(("wanx+compile", rel_err(out, b)))
    times = interleaved(fns, repeats=repeats, warmup=0 if size.name == "medium" else 1, device=device)
    row = {"size": size.name, "what": f"DiT step + CFG ({size.tokens} tok, ctx {size.ctx_lens})", "ref_impl": "diffusers",
           "max_rel_diff": err, **summarize({k: times[k] for k in ("wanx", "ref")})}
    row.update(flop_counts(size))
    row["tflops_achieved"] = {k: row["flops_per_step"][k] / v / 1e12 for k, v in row["median_s"].items()}
    extra = [{"size": size.name, "what": f"DiT step + CFG, {name} (blocks)", "ref_impl": "diffusers",
              "max_rel_diff": diff, **summarize({"wanx": times[name], "ref": times["ref"]})}
             for name, diff in compiled_diffs]
    rows = [row, *extra]
    del model, ref
    if mem:
        row["memory"] = {impl: peak_memory("dit", impl, size.name) for impl in ("wanx", "ref")}
    return rows


def mem_child(size: Size, impl: str, device: str) -> dict[str, Any]:
    """Body of the fresh-subprocess memory probe: build one implementation, measure one guided step."""
    latent, t, ctx, ctx_null = make_inputs(size, device)
    if impl == "wanx":
        step = wanx_step(build_wanx(size, device))
    else:
        ref = build_diffusers_alone(size, device)
        step = diffusers_step(ref, size.dit.text_len)
    return measure_call_memory(lambda: step(latent, t, ctx, ctx_null), device)


def profile(size: Size, device: str, impl: str, row_limit: int = 25) -> str:
    """torch.profiler table of one guided step (CPU self time, by op)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    model = build_wanx(size, device)
    latent, t, ctx, ctx_null = make_inputs(size, device)
    step = wanx_step(model) if impl == "wanx" else diffusers_step(build_diffusers_sharing(model), size.dit.text_len)
    step(latent, t, ctx, ctx_null)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with tprofile(activities=acts) as prof:
        step(latent, t, ctx, ctx_null)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


def rope_complex128(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The official RoPE product, baseline of the "complex128 RoPE" ablation (wanx uses complex64 tables).

    ``x [B, L, H, D]`` rotated by ``freqs [L, D/2]`` (complex128) in complex float64, rounded once to float32.
    """
    b, l, h, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(b, l, h, d // 2, 2))  # [B, L, H, D/2]
    out = torch.view_as_real(xc * freqs[None, :, None, :])  # [B, L, H, D/2, 2]
    return out.reshape(b, l, h, d).float()  # [B, L, H, D]


def ablate(size: Size, repeats: int, device: str, baseline_pkg: str | None = None) -> list[dict[str, Any]]:
    """One interleaved run of the DiT step with each speed change switched off in turn (bench/NOTES.md).

    Variants share the weights. ``baseline_pkg`` names an importable copy of an older wanx (e.g.
    ``git archive HEAD wanx`` unpacked as package ``wanx_base``) whose WanDiT is timed alongside.
    """
    import contextlib
    import importlib

    import wanx.model.dit as dit_mod
    import wanx.model.rope as rope_mod

    model = build_wanx(size, device)
    ref = build_diffusers_sharing(model)
    inputs = make_inputs(size, device)
    step, ref_step = wanx_step(model), diffusers_step(ref, size.dit.text_len)

    @contextlib.contextmanager
    def patched(obj, name, value):
        old = getattr(obj, name)
        setattr(obj, name, value)
        try:
            yield
        finally:
            setattr(obj, name, old)

    def complex_rope_tables(grid, head_dim):
        return rope_mod.rope_freqs(grid, head_dim)  # complex128 [L, D/2], the official path

    def variant(*patches):
        def run():
            with contextlib.ExitStack() as stack:
                for p in patches:
                    stack.enter_context(patched(*p))
                model.rope.clear()
                return step(*inputs)
        return run

    fns = {
        "wanx (all changes)": variant(),
        "no text compaction": variant((dit_mod.WanDiT, "_can_compact_text", lambda self, x: False)),
        "batched CFG on CPU": variant((model, "cpu_sample_by_sample", False)),
        "complex128 RoPE": variant((rope_mod, "rope_tables", complex_rope_tables),
                                   (dit_mod, "apply_rope_c64", rope_complex128)),
        "diffusers": lambda: ref_step(*inputs),
    }
    outs = {k: f() for k, f in fns.items()}
    if baseline_pkg:
        base_cls = importlib.import_module(baseline_pkg + ".model").WanDiT
        base = base_cls(model.cfg).to(device).eval()
        base.load_state_dict(model.state_dict(), strict=True, assign=True)
        base_step = wanx_step(base)
        fns["baseline (git HEAD)"] = lambda: base_step(*inputs)
        outs["baseline (git HEAD)"] = fns["baseline (git HEAD)"]()
    times = interleaved(fns, repeats=repeats, warmup=0, device=device)
    import statistics
    ref_med = statistics.median(times["diffusers"])
    rows = []
    for k, v in times.items():
        med = statistics.median(v)
        rows.append({"size": size.name, "what": f"ablation: {k}", "median_s": {"wanx": med, "ref": ref_med},
                     "ratio": med / ref_med, "samples_s": v, "max_rel_diff": rel_err(outs[k], outs["diffusers"])})
    return rows
