"""Ulysses sequence parallelism on 2 (and 4) gloo processes equals the single-process DiT.

Every rank builds the same random tiny DiT, runs it whole (the reference), then sequence-parallel
on the same inputs; rank 0 writes both outputs and the test compares them. Token counts divisible
and not divisible by the group size (the padded case), per-sample and per-token timesteps, a
batch of two (batched CFG) and i2v's extra channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from wanx.configs import DiTConfig
from wanx.distributed import ParallelConfig, check_parallel, run_local
from wanx.errors import InputError

TIMEOUT_S = 240


def _inputs(cfg: DiTConfig, grid: tuple[int, int, int], batch: int, per_token: bool, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    x = torch.randn(batch, cfg.out_dim, t, h, w, generator=g)
    y = torch.randn(batch, cfg.in_dim - cfg.out_dim, t, h, w, generator=g) if cfg.in_dim > cfg.out_dim else None
    context = torch.randn(batch, 7, cfg.text_dim, generator=g)
    context[:, 5:] = 0  # prompts of 5 tokens, zero-padded
    tokens = (t // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    ts = torch.rand(batch, tokens, generator=g) * 1000 if per_token else torch.tensor([700.0] * batch)
    return x, ts, context, y


def _tiny_dit(model_type: str, num_heads: int, dim: int = 64):
    from wanx.model import WanDiT

    torch.manual_seed(0)
    cfg = DiTConfig.tiny(model_type, num_heads=num_heads, dim=dim)
    model = WanDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for block in model.blocks:  # unit-ish norm scales so attention is not trivially uniform
            block.self_attn.norm_q.weight.fill_(1.0)
            block.self_attn.norm_k.weight.fill_(1.0)
    return model


def _ulysses_worker(out_path: str, model_type: str, num_heads: int, grid, batch: int, per_token: bool) -> None:
    import torch.distributed as dist

    from wanx.distributed import apply_ulysses, init_process_group

    init_process_group("cpu")
    model = _tiny_dit(model_type, num_heads)
    x, t, context, y = _inputs(model.cfg, grid, batch, per_token)
    with torch.no_grad():
        whole = model(x, t, context, y=y)
        apply_ulysses(model, dist.group.WORLD)
        split = model(x, t, context, y=y)
    if dist.get_rank() == 0:
        torch.save({"whole": whole, "split": split}, out_path)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = {  # name: (model_type, heads, latent grid (T, H, W), batch, per-token t, ranks)
    "t2v-even": ("t2v", 2, (3, 4, 6), 1, False, 2),  # 3*2*3 = 18 tokens
    "t2v-odd-cfgbatch": ("t2v", 2, (3, 2, 6), 2, False, 2),  # 9 tokens: one padded token
    "i2v-odd": ("i2v", 2, (5, 2, 2), 1, False, 2),  # 5 tokens
    "ti2v-per-token-odd": ("ti2v", 2, (3, 6, 2), 1, True, 2),  # 9 tokens, per-token timesteps
    "t2v-4ranks-pad3": ("t2v", 4, (1, 2, 10), 1, False, 4),  # 5 tokens over 4 ranks: 3 padded
}


@pytest.mark.parametrize("case", list(CASES))
def test_ulysses_equals_single_process(case, tmp_path):
    model_type, heads, grid, batch, per_token, ranks = CASES[case]
    out = tmp_path / "out.pt"
    run_local(_ulysses_worker, ranks, str(out), model_type, heads, grid, batch, per_token, timeout_s=TIMEOUT_S)
    res = torch.load(out)
    err = _rel_err(res["split"], res["whole"])
    print(f"{case}: Ulysses over {ranks} ranks vs one process, max relative error {err:.3e}")
    assert res["split"].shape == res["whole"].shape
    assert res["whole"].abs().max() > 0.1  # a meaningful output, not zeros
    assert err <= 1e-5


def test_a_head_count_the_group_cannot_split_is_refused_before_loading():
    with pytest.raises(InputError, match=r"ulysses_size 3 does not divide the model's 40 attention heads; "
                                         r"use one of \[1, 2, 4, 5, 8, 10, 20, 40\]"):
        check_parallel(ParallelConfig(ulysses_size=3), world_size=3, num_heads=40)
    check_parallel(ParallelConfig(ulysses_size=8), world_size=8, num_heads=40)  # fine


def test_splits_that_do_not_match_the_launch_are_refused():
    with pytest.raises(InputError, match="^ulysses_size needs several processes"):
        check_parallel(ParallelConfig(ulysses_size=2), world_size=1, num_heads=40)
    with pytest.raises(InputError, match="^dit_fsdp needs several processes") as e:
        check_parallel(ParallelConfig(dit_fsdp=True), world_size=1, num_heads=40)
    assert e.value.message_for({"dit_fsdp": "--dit_fsdp"}).startswith("--dit_fsdp needs several processes")
    with pytest.raises(InputError, match="does not divide the 6 processes"):
        check_parallel(ParallelConfig(ulysses_size=4), world_size=6, num_heads=40)
    with pytest.raises(InputError, match="does not divide the 2 processes"):
        check_parallel(ParallelConfig(ulysses_size=2, cfg_parallel=True), world_size=2, num_heads=40)
    check_parallel(ParallelConfig(ulysses_size=2, cfg_parallel=True), world_size=4, num_heads=40)


def _fsdp_load_worker(out_dir: str, ckpt_dir: str) -> None:
    import json
    import pathlib

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from wanx.distributed import fsdp
    from wanx.distributed.launch import _load_expert, setup
    from wanx.loading.dit import load_dit

    reads = []
    rows = fsdp.TensorSource.rows
    fsdp.TensorSource.rows = lambda self, k, a, b: reads.append((k, a, b, self.shapes[k])) or rows(self, k, a, b)
    config = ParallelConfig(dit_fsdp=True)
    _, mesh = setup(config, num_heads=2, device="cpu")
    whole = load_dit(ckpt_dir)
    model = _load_expert(ckpt_dir, whole.cfg, config, mesh, torch.device("cpu"), torch.float32)
    sharded = {k: v for k, v in model.state_dict().items() if isinstance(v, DTensor)}
    local = sum(v.to_local().numel() for v in sharded.values())
    total = sum(v.numel() for v in whole.state_dict().values())
    same = all(torch.equal(v.full_tensor(), whole.state_dict()[k]) for k, v in model.state_dict().items())
    # rows read beyond a rank's share, ceil(n / 2), of any tensor (0: never more than its share)
    excess = max((b - a) - -(-shape[0] // 2) for _, a, b, shape in reads if shape)
    pathlib.Path(out_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(
        {"local": local, "total": total, "same": same, "excess": excess, "reads": len(reads), "sharded": len(sharded),
         "keys": len(whole.state_dict())}))


def test_fsdp_ranks_read_and_hold_only_their_rows(tmp_path):
    import json

    from wanx.loading.dit import save_dit

    save_dit(_tiny_dit("t2v", 2), tmp_path / "dit", layout="official")
    run_local(_fsdp_load_worker, 2, str(tmp_path), str(tmp_path / "dit"), timeout_s=TIMEOUT_S)
    for rank in range(2):
        r = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"rank {rank}: holds {r['local']} of {r['total']} weights, {r['reads']} row-range reads")
        assert r["same"]  # the gathered shards are the checkpoint, exactly
        assert r["sharded"] == r["keys"]  # every tensor is sharded
        assert r["local"] <= r["total"] / 2 + 1000  # about half (uneven rows round up)
        assert r["reads"] == r["keys"] and r["excess"] <= 0  # one read per tensor, of this rank's rows only


# ---------------------------------------------------------------------------------------------------
# Three-way parity: wanx Ulysses == the official sp_dit_forward (run on gloo) == wanx in one process.

OFFICIAL_SRC = Path(os.environ.get("WANX_OFFICIAL_SRC", Path(__file__).resolve().parents[1] / ".venv" / "reference"
                                   / "wan"))


def _official_sp_modules():
    """The official model and sequence-parallel modules, loaded without the package inits (heavy imports)."""
    import importlib.util
    import sys
    import types

    for pkg, sub in (("_wansp", ""), ("_wansp.modules", "modules"), ("_wansp.distributed", "distributed")):
        if pkg not in sys.modules:
            module = types.ModuleType(pkg)
            module.__path__ = [str(OFFICIAL_SRC / sub)]
            sys.modules[pkg] = module
    for name in ("modules.attention", "modules.model", "distributed.util", "distributed.ulysses",
                 "distributed.sequence_parallel"):
        full = f"_wansp.{name}"
        if full not in sys.modules:
            spec = importlib.util.spec_from_file_location(full, OFFICIAL_SRC / (name.replace(".", "/") + ".py"))
            sys.modules[full] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[full])
    return (sys.modules["_wansp.modules.model"], sys.modules["_wansp.distributed.ulysses"],
            sys.modules["_wansp.distributed.sequence_parallel"])


def _official_worker(out_path: str, grid, heads: int, dim: int) -> None:
    import functools
    import math
    import types

    import torch.distributed as dist

    from wanx.distributed import apply_ulysses, init_process_group
    from wanx.model.attention import attention

    init_process_group("cpu")  # gloo first, so the official init (nccl) is never reached
    model_mod, ulysses_mod, sp_mod = _official_sp_modules()

    def fp32_attention(q, k, v, k_lens=None, **kw):  # the official flash_attention, k_lens as a key mask
        if k_lens is None:
            return attention(q, k, v)
        keep = torch.arange(k.shape[1])[None, :] < k_lens[:, None]
        return attention(q, k, v, bias=torch.where(keep, 0.0, float("-inf"))[:, None, None, :])

    ulysses_mod.flash_attention = model_mod.flash_attention = fp32_attention  # self- and cross-attention
    ours = _tiny_dit("t2v", heads, dim)
    ref = model_mod.WanModel(**ours.cfg.to_dict()).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    ref.forward = types.MethodType(sp_mod.sp_dit_forward, ref)
    for block in ref.blocks:  # dtype fp32: the official bf16 cast needs CUDA autocast around `o`
        block.self_attn.forward = types.MethodType(functools.partial(sp_mod.sp_attn_forward, dtype=torch.float32),
                                                   block.self_attn)
    x, t, context, _ = _inputs(ours.cfg, grid, 1, False)
    tokens = math.prod(g // p for g, p in zip(grid, ours.cfg.patch_size))
    seq_len = math.ceil(tokens / dist.get_world_size()) * dist.get_world_size()
    with torch.no_grad():
        whole = ours(x, t, context)
        official = ref([x[0]], t, [context[0, :5]], seq_len=seq_len)[0][None]
        split = apply_ulysses(ours, dist.group.WORLD)(x, t, context)
    if dist.get_rank() == 0:
        torch.save({"whole": whole, "official": official, "split": split}, out_path)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("ranks,heads,dim,grid", [(2, 2, 64, (3, 2, 6)),  # 9 tokens: 1 padded
                                                  (3, 6, 96, (5, 2, 4))])  # 10 tokens: 2 padded
def test_ulysses_matches_the_official_sequence_parallel_code(ranks, heads, dim, grid, tmp_path):
    if not (OFFICIAL_SRC / "distributed" / "sequence_parallel.py").is_file():
        message = f"official Wan source not found at {OFFICIAL_SRC} (`bash scripts/setup.sh all` fetches it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("diffusers")
    out = tmp_path / "out.pt"
    run_local(_official_worker, ranks, str(out), grid, heads, dim, timeout_s=TIMEOUT_S)
    res = torch.load(out)
    vs_official = _rel_err(res["split"], res["official"])
    vs_whole = _rel_err(res["split"], res["whole"])
    print(f"{ranks} ranks: wanx Ulysses vs official SP {vs_official:.3e}, vs wanx one process {vs_whole:.3e}")
    assert res["official"].abs().max() > 0.1
    assert vs_official <= 1e-5 and vs_whole <= 1e-5


def test_the_cli_flags_import_without_torch():
    """``wanx --help`` must not pay for torch: the flag modules the CLI imports stay light."""
    import json
    import subprocess
    import sys

    code = ("import sys, json, argparse\nfrom wanx.distributed.flags import add_distributed_flags\n"
            "from wanx.batch.cli import add_batch_flags\nimport wanx.distributed\n"
            "p = argparse.ArgumentParser(); add_distributed_flags(p)\n"
            "print(json.dumps([m for m in sys.modules if m == 'torch' or m.startswith('torch.')]))")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
