"""Step caches (wanx.cache): MagCache's skip schedule on scripted residuals, its ratio tables,
calibration, the --cache syntax, and whole denoising runs on tiny checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

import wanx
from wanx.cache import (FirstBlockCache, MagCache, RatioRecorder, RatioTable, calibrate_magcache, denoise_request,
                        nearest_resample, parse_cache_spec, protected_steps, resolve_cache)
from wanx.cache.command import main as calibrate_main
from wanx.cache.spec import CacheSpec, published_table_for, retention_rule_for
from wanx.configs import DiTConfig, get_task
from wanx.pipelines.denoise import run_plan
from wanx.request import ModelFacts
from wanx.sampling.plan import PlanStep, SamplingPlan, build_plan
from wanx.testing import build_tiny_checkpoint

# ------------------------------------------------------------------ a block stack we script


class ScaledBlock(torch.nn.Module):
    """A "block" whose residual is ``scale[step] * x``: its magnitude is what the test scripts."""

    def __init__(self, scales):
        super().__init__()
        self.scales, self.step, self.calls = list(scales), 0, 0

    def forward(self, x, e0, context, rope, ctx_bias):
        self.calls += 1
        return x + self.scales[self.step] * x


class FakeExpert:
    """Stands in for a WanDiT: its forward is only the block stack, run through ``block_runner``."""

    def __init__(self, scales, depth: int = 1):
        self.blocks = torch.nn.ModuleList(ScaledBlock(scales) for _ in range(depth))
        self.block = self.blocks[0]
        self.block_runner = None

    def at_step(self, index: int) -> None:
        for block in self.blocks:
            block.step = index

    def __call__(self, x):
        from wanx.model.dit import run_blocks

        return (self.block_runner or run_blocks)(self.blocks, x, None, None, None, None)


COND_X = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # [1, L=2, dim=2]
UNCOND_X = torch.tensor([[[-2.0, 1.0], [0.5, 4.0]]])


def one_expert_plan(steps: int, guide: float = 5.0) -> SamplingPlan:
    return build_plan("unipc", steps, 5.0, (guide, guide), None, 1)


def drive(cache, plan, expert, mode="batched", inputs=None):
    """Walk ``plan`` the way guided_velocity calls the DiT; returns (run, outputs per step)."""
    outs = []
    run = cache.attach([expert], plan)
    try:
        for step in plan:
            run.begin_step(step)
            expert.at_step(step.index)
            cond, uncond = inputs(step.index) if inputs else (COND_X, UNCOND_X)
            if not step.uncond:
                outs.append([expert(cond)])
            elif mode == "batched":
                outs.append(list(expert(torch.cat([cond, uncond])).split(1)))
            else:
                outs.append([expert(cond), expert(uncond)])
    finally:
        run.detach()
    return run, outs


def table(cond, uncond=None, switch=None):
    return RatioTable(cond=tuple(cond), uncond=None if uncond is None else tuple(uncond), switch_step=switch,
                      source="test")


def skipped_steps(run, branch=0):
    return sorted({s for s, branches, skipped in run.trace if skipped and branch in branches})


# ------------------------------------------------------------------ the skip schedule


@pytest.mark.parametrize("mode", ["batched", "split"])
def test_drift_threshold_and_k_decide_the_skips(mode):
    plan = one_expert_plan(10)
    expert = FakeExpert([0.5] * 10)
    ratios = table([1.0] + [0.99] * 9, [1.0] + [0.99] * 9)
    # After a computed step the drift is 0.01, then 0.01 + 0.0199: both under 0.06, K=2 ends the run.
    run, _ = drive(MagCache(ratios, threshold=0.06, max_skips=2, retention=0.0), plan, expert, mode)
    assert skipped_steps(run, 0) == skipped_steps(run, 1) == [1, 2, 4, 5, 7, 8]
    assert (run.computed, run.skipped) == (8, 12) and expert.block.calls == (4 if mode == "batched" else 8)
    run, _ = drive(MagCache(ratios, threshold=0.06, max_skips=1, retention=0.0), plan, FakeExpert([0.5] * 10), mode)
    assert skipped_steps(run) == [1, 3, 5, 7, 9]
    run, _ = drive(MagCache(ratios, threshold=0.02, max_skips=5, retention=0.0), plan, FakeExpert([0.5] * 10), mode)
    assert skipped_steps(run) == [1, 3, 5, 7, 9]  # the second step's drift 0.0299 is over 0.02
    run, _ = drive(MagCache(table([1.0] + [0.9] * 9), threshold=0.06, retention=0.0), plan, FakeExpert([0.5] * 10))
    assert skipped_steps(run) == [] and run.computed == 20


def test_a_skipped_step_adds_its_own_branchs_last_residual():
    scales = [0.5, 0.3, 0.2, 0.1]
    run, outs = drive(MagCache(table([1.0] * 4), threshold=0.06, max_skips=1, retention=0.0), one_expert_plan(4),
                      FakeExpert(scales), "split")
    assert skipped_steps(run) == [1, 3]
    for step, computed_at in [(0, 0), (1, 0), (2, 2), (3, 2)]:
        assert torch.equal(outs[step][0], COND_X + scales[computed_at] * COND_X)
        assert torch.equal(outs[step][1], UNCOND_X + scales[computed_at] * UNCOND_X)


def test_threshold_zero_never_skips():
    run, outs = drive(MagCache(table([1.0] * 6), threshold=0.0, retention=0.0), one_expert_plan(6),
                      FakeExpert([0.1 * i for i in range(6)]))
    assert run.skipped == 0 and run.computed == 12
    assert all(torch.equal(o[0], COND_X + (0.1 * i) * COND_X) for i, o in enumerate(outs))


def test_branches_that_disagree_in_a_batched_call_both_compute():
    # The uncond drift crosses the threshold at step 2; the cond one never does.
    ratios = table([1.0] * 5, [1.0, 0.99, 0.9, 0.99, 0.99])
    cache = MagCache(ratios, threshold=0.06, max_skips=10, retention=0.0)
    split, _ = drive(cache, one_expert_plan(5), FakeExpert([0.5] * 5), "split")
    assert skipped_steps(split, 0) == [1, 2, 3, 4] and skipped_steps(split, 1) == [1, 3, 4]
    batched, _ = drive(cache, one_expert_plan(5), FakeExpert([0.5] * 5), "batched")
    # Step 2 runs the batch, which refreshes the cond residual too (its drift restarts from 0).
    assert skipped_steps(batched, 0) == skipped_steps(batched, 1) == [1, 3, 4]
    assert cache.last_stats == {"kind": "magcache", "computed": 4, "skipped": 6, "evaluations": 10,
                                "blocks_run": 4, "steps": 5}


def test_guidance_one_runs_one_branch_per_step():
    expert = FakeExpert([0.5] * 8)
    run, outs = drive(MagCache(table([1.0] + [0.99] * 7), threshold=0.06, retention=0.0),
                      one_expert_plan(8, guide=1.0), expert)
    assert all(len(o) == 1 for o in outs)
    assert {b for _, branches, _ in run.trace for b in branches} == {0}
    assert skipped_steps(run) == [1, 2, 4, 5, 7] and (run.computed, run.skipped) == (3, 5)


def test_a_branch_missing_the_step_before_computes():
    steps = [PlanStep(index=i, timestep=torch.tensor(900 - i), sigma=0.9, sigma_next=0.8, expert=0,
                      guide_scale=g) for i, g in enumerate([3.0, 1.0, 3.0, 3.0])]
    plan = SamplingPlan(solver="unipc", shift=5.0, steps=tuple(steps))
    run, _ = drive(MagCache(table([1.0] * 4), threshold=0.06, max_skips=5, retention=0.0), plan,
                   FakeExpert([0.5] * 4), "split")
    assert skipped_steps(run, 0) == [1, 2, 3]
    assert skipped_steps(run, 1) == [3]  # no uncond pass at step 1: its residual is two steps old at step 2


def test_a_residual_of_another_latent_grid_is_not_reused():
    grids = {0: (COND_X, UNCOND_X), 1: (COND_X.repeat(1, 2, 1), UNCOND_X.repeat(1, 2, 1))}
    run, outs = drive(MagCache(table([1.0] * 3), threshold=0.06, max_skips=5, retention=0.0), one_expert_plan(3),
                      FakeExpert([0.5] * 3), inputs=lambda s: grids[min(s, 1)])
    assert skipped_steps(run) == [2]
    assert outs[1][0].shape == (1, 4, 2)


def test_the_runner_is_removed_after_the_run_and_on_error():
    expert = FakeExpert([0.5] * 3)
    previous = expert.block_runner = lambda blocks, x, *rest: x * 7  # another wrapper, kept inside
    run, outs = drive(MagCache(table([1.0] * 3), threshold=0.0), one_expert_plan(3), expert)
    assert expert.block_runner is previous and torch.equal(outs[0][0], COND_X * 7)

    def boom(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        drive(MagCache(table([1.0] * 3), threshold=0.0), one_expert_plan(3), expert, inputs=boom)
    assert expert.block_runner is previous


def test_the_block_stack_outside_a_step_is_an_error():
    expert = FakeExpert([0.5])
    cache = MagCache(table([1.0]), threshold=0.06)
    with cache.session([expert], one_expert_plan(1)), pytest.raises(RuntimeError, match="begin_step"):
        expert(COND_X)


def test_first_block_cache_skips_the_rest_while_the_first_residual_holds():
    expert = FakeExpert([0.5, 0.5, 0.6, 0.6, 0.62], depth=3)
    run, outs = drive(FirstBlockCache(0.1), one_expert_plan(5), expert, "split")
    # Step 2's first residual moved by 0.1/0.5 = 20 %: compute; 0.02/0.6 at step 4 is under 10 %.
    assert skipped_steps(run, 0) == skipped_steps(run, 1) == [1, 3, 4]
    assert run.blocks_run == 2 * (2 * 3 + 3 * 1) and [b.calls for b in expert.blocks] == [10, 4, 4]
    first = COND_X + 0.62 * COND_X
    tail = 1.6 ** 3 * COND_X - 1.6 * COND_X  # the last two blocks' residual when step 2 computed
    assert torch.allclose(outs[4][0], first + tail)


# ------------------------------------------------------------------ retention windows


@pytest.mark.parametrize("rule, steps, switch, expected", [
    ("t2v", 40, 26, set(range(6)) | {26, 27, 28}),  # ceil(0.2*26) = 6, ceil(0.2*14) = 3
    ("i2v", 40, 15, set(range(20))),  # every high-noise step, then ceil(0.2*25) = 5
    ("ti2v", 50, 50, set(range(10))),
    ("ti2v", 25, 25, set(range(5))),  # 0.2*25 rounds to exactly 5, not 6
    ("t2v", 25, 12, {0, 1, 2, 12, 13, 14}),
])
def test_retention_windows(rule, steps, switch, expected):
    assert protected_steps(rule, steps, switch, 0.2) == expected
    assert protected_steps(rule, steps, switch, 0.0) == (set(range(switch)) if rule == "i2v" else set())


def test_retention_keeps_the_blocks_running_after_the_expert_switch():
    plan = build_plan("unipc", 20, 5.0, (3.0, 3.0), 0.9, 2)
    assert next(s.index for s in plan if s.expert == 1) == 8
    expert = FakeExpert([0.5] * 20)
    ratios = table([1.0] * 20)
    # R = 0.1: ceil(0.8) = 1 high-noise step, ceil(1.2) = 2 low-noise steps. The ratios never stop a
    # skip, so exactly the retained steps compute.
    for rule, computed in [("t2v", {0, 8, 9}), ("i2v", set(range(10))), ("ti2v", {0, 1})]:
        run, _ = drive(MagCache(ratios, threshold=0.06, max_skips=100, retention=0.1, retention_rule=rule), plan,
                       expert)
        assert set(range(20)) - set(skipped_steps(run)) == computed


# ------------------------------------------------------------------ ratio tables


def test_nearest_resample():
    assert nearest_resample([1, 2, 3, 4, 5], 3) == [1, 3, 5]
    assert nearest_resample([1, 2], 4) == [1, 1, 2, 2]  # i*(1/3) -> 0, 0.33, 0.67, 1: halves and up round up
    assert nearest_resample([7, 8, 9], 1) == [7] and nearest_resample([7, 8], 0) == []


@pytest.mark.parametrize("name, steps, switch", [("t2v-A14B", 40, 26), ("i2v-A14B", 40, 15),
                                                 ("ti2v-5B:t2v", 50, None), ("ti2v-5B:i2v", 50, None)])
def test_published_tables(name, steps, switch):
    t = RatioTable.published(name)
    assert t.steps == len(t.uncond) == steps and t.cond[0] == t.uncond[0] == 1.0 and t.switch_step == switch
    assert t.for_plan(steps, switch) == [list(t.cond), list(t.uncond)]  # the measured step count: unchanged
    if switch is not None:  # the drop at the switch is the table's one outlier
        assert min(t.cond[1:-4]) == t.cond[switch] < 0.95


@pytest.mark.parametrize("steps, switch", [(25, 12), (10, 6), (80, 52), (41, 27), (5, 1), (4, 4)])
def test_interpolation_keeps_the_switch_drop_on_the_first_low_noise_step(steps, switch):
    t = RatioTable.published("t2v-A14B")
    cond, uncond = t.for_plan(steps, switch)
    assert len(cond) == len(uncond) == steps and cond[0] == 1.0
    dips = [i for i, v in enumerate(cond) if v < 0.7]
    assert dips == ([switch] if switch < steps else [])
    if switch < steps:
        assert uncond[switch] == t.uncond[26] and cond[-1] == t.cond[-1]


def test_interpolating_the_whole_array_would_misplace_the_drop():
    # What the per-expert split avoids: resampling all 40 steps to 25 puts the drop on step 16, but
    # with 25 steps (shift 12) the low-noise expert takes over at step 12.
    table_ = RatioTable.published("t2v-A14B")
    whole = nearest_resample(table_.cond, 25)
    assert [i for i, v in enumerate(whole) if v < 0.7] == [16]
    assert [i for i, v in enumerate(table_.for_plan(25, 12)[0]) if v < 0.7] == [12]


# ------------------------------------------------------------------ --cache values and model facts


def test_parse_cache_spec():
    assert parse_cache_spec("magcache") == CacheSpec("magcache")
    assert parse_cache_spec("MagCache:0.08") == CacheSpec("magcache", threshold=0.08)
    assert parse_cache_spec("magcache:0.1,K=3,R=0.4,ratios=C:/rx.json") == CacheSpec(
        "magcache", threshold=0.1, max_skips=3, retention=0.4, ratios="C:/rx.json")
    assert parse_cache_spec("magcache,ratios=demo.json") == CacheSpec("magcache", ratios="demo.json")
    assert parse_cache_spec("fbcache:0.2") == CacheSpec("fbcache", threshold=0.2)
    assert parse_cache_spec("none") is None


@pytest.mark.parametrize("text", ["teacache", "magcache:x", "magcache:0.1,K=1.5", "magcache:0.1,0.2",
                                  "magcache,ratios=", "fbcache:0.1,K=2", "", "magcache:0.1,Q=1"])
def test_bad_cache_values_name_the_argument(text):
    with pytest.raises(wanx.InputError) as e:
        parse_cache_spec(text)
    assert e.value.argument == "cache" and "magcache[:THRESH]" in str(e.value)


def facts_for(task: str, dit: DiTConfig | None = None, experts: int | None = None) -> ModelFacts:
    spec = get_task(task)
    return ModelFacts(spec=spec, dit=dit or spec.dit, num_experts=experts or (2 if spec.is_moe else 1))


def test_official_checkpoints_get_their_published_table_and_rule():
    assert published_table_for(facts_for("t2v-A14B"), False) == "t2v-A14B"
    assert published_table_for(facts_for("ti2v-5B"), True) == "ti2v-5B:i2v"
    assert published_table_for(facts_for("ti2v-5B"), False) == "ti2v-5B:t2v"
    assert [retention_rule_for(facts_for(t)) for t in ("t2v-A14B", "i2v-A14B", "ti2v-5B")] == ["t2v", "i2v", "ti2v"]
    cache = resolve_cache("magcache:0.05,K=3,R=0.1", facts_for("i2v-A14B"))
    assert cache.describe() == {"kind": "magcache", "threshold": 0.05, "max_skips": 3, "retention": 0.1,
                                "retention_rule": "i2v", "ratios": "published:i2v-A14B"}


def test_a_custom_model_needs_measured_ratios():
    tiny = facts_for("t2v-A14B", DiTConfig.tiny("t2v"))
    with pytest.raises(wanx.InputError, match="wanx calibrate magcache"):
        resolve_cache("magcache", tiny)
    named = resolve_cache("magcache,ratios=t2v-A14B", tiny)  # a published table chosen by name
    assert named.ratios.source == "published:t2v-A14B" and named.retention_rule == "t2v"
    one = facts_for("i2v-A14B", DiTConfig.tiny("i2v"), experts=1)
    assert retention_rule_for(one) == "ti2v"
    assert isinstance(resolve_cache("fbcache", tiny), FirstBlockCache)


@pytest.mark.parametrize("kw, match", [({"threshold": -1}, "threshold"), ({"max_skips": 1.5}, "K"),
                                       ({"retention": 2}, "retention")])
def test_bad_settings_are_input_errors(kw, match):
    with pytest.raises(wanx.InputError, match=match):
        MagCache(table([1.0]), **kw)


def test_a_bad_ratios_file_is_an_input_error(tmp_path):
    bad = tmp_path / "r.json"
    bad.write_text(json.dumps({"format": "wanx-magcache-ratios", "ratios": {"cond": [1.0, -2]}}))
    with pytest.raises(wanx.InputError, match="positive"):
        RatioTable.load(bad)
    with pytest.raises(wanx.InputError, match="not found"):
        RatioTable.load(tmp_path / "missing.json")
    bad.write_text("{}")
    with pytest.raises(wanx.InputError, match="not a MagCache ratios file"):
        RatioTable.load(bad)


# ------------------------------------------------------------------ calibration


def test_the_recorder_measures_the_scripted_magnitude_ratios():
    scales = [0.8 * 0.9 ** i for i in range(6)]
    recorder = RatioRecorder()
    drive(recorder, one_expert_plan(6), FakeExpert(scales), "split")
    t = recorder.last_run.table({}, "x")
    assert t.cond[0] == 1.0 and all(math.isclose(v, 0.9, rel_tol=1e-6) for v in t.cond[1:] + t.uncond[1:])


@pytest.fixture(scope="module")
def t2v_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cache") / "ckpt", "t2v-A14B", seed=5)


@pytest.fixture(scope="module")
def t2v_pipe(t2v_dir):
    return wanx.load_pipeline(t2v_dir, device="cpu")


def request(pipe, **kw):
    args = dict(size=(64, 64), frame_num=5, sample_steps=8, seed=3)
    return pipe.resolve("a red circle moving left", **{**args, **kw})


def constant_residual_pipe(t2v_dir):
    """The tiny model with every block's residual fixed: output projections zero but the FFN bias, no timestep
    modulation. Each expert's residual is the same at every step, so its ratios must be 1."""
    pipe = wanx.load_pipeline(t2v_dir, device="cpu")
    with torch.no_grad():
        for expert in pipe.experts:
            expert.time_projection[1].weight.zero_()
            expert.time_projection[1].bias.zero_()
            for block in expert.blocks:
                for layer in (block.self_attn.o, block.cross_attn.o):
                    layer.weight.zero_()
                    layer.bias.zero_()
                block.ffn[2].weight.zero_()
    return pipe


def test_calibration_writes_a_file_the_cache_loads(t2v_dir, t2v_pipe, tmp_path):
    out = tmp_path / "ratios.json"
    measured = calibrate_magcache(t2v_pipe, "a red circle moving left", 8, out=out, size=(64, 64), frame_num=5)
    loaded = RatioTable.load(out)
    assert loaded.cond == measured.cond and loaded.uncond == measured.uncond and loaded.steps == 8
    assert loaded.switch_step == next(s.index for s in t2v_pipe.plan(request(t2v_pipe)) if s.expert == 1)
    assert loaded.settings["steps"] == 8 and loaded.settings["size"] == "64*64" and loaded.source == "ratios.json"
    assert max(abs(v - 1) for v in loaded.cond[1:]) > 1e-3  # a real model's residual does change
    cache = resolve_cache(f"magcache,ratios={out}", t2v_pipe.facts)
    assert cache.ratios.cond == loaded.cond
    with pytest.raises(FileExistsError):
        calibrate_magcache(t2v_pipe, "x", 8, out=out)

    flat = calibrate_magcache(constant_residual_pipe(t2v_dir), "a red circle moving left", 8, size=(64, 64),
                              frame_num=5)
    # Constant within each expert; the two experts' constants differ, so only the switch step moves.
    switch = flat.switch_step
    for series in (flat.cond, flat.uncond):
        assert all(abs(v - 1) < 1e-5 for i, v in enumerate(series) if i != switch)
        assert abs(series[switch] - 1) > 0.01


def test_calibrate_command(t2v_dir, tmp_path, capsys):
    out = tmp_path / "cli.json"
    args = ["magcache", "--ckpt_dir", str(t2v_dir), "--out", str(out), "--sample_steps", "4", "--size", "64*64",
            "--frame_num", "5", "--device", "cpu"]
    assert calibrate_main(args) == 0 and RatioTable.load(out).steps == 4
    assert "4 steps, cond + uncond" in capsys.readouterr().out
    assert calibrate_main(args) == 2 and "already exists" in capsys.readouterr().err
    assert calibrate_main([*args, "--overwrite", "--sample_steps", "0"]) == 2
    assert "--sample_steps" in capsys.readouterr().err
    assert calibrate_main([*args[:4], str(tmp_path / "r.txt")]) == 2 and ".json" in capsys.readouterr().err


# ------------------------------------------------------------------ whole runs on a tiny checkpoint


def video(pipe, req, cache=None):
    return pipe.decode(denoise_request(pipe, req, cache))


@pytest.mark.parametrize("batch_cfg, split", [(True, False), (False, False), (True, True)])
def test_threshold_zero_is_bit_identical_to_uncached(t2v_dir, batch_cfg, split):
    pipe = wanx.load_pipeline(t2v_dir, device="cpu", batch_cfg=batch_cfg)
    for expert in pipe.experts:
        expert.cpu_sample_by_sample = split
    req = request(pipe)
    uncached = pipe.run(req).tensor
    for cache in (MagCache(RatioTable.published("t2v-A14B"), threshold=0.0), FirstBlockCache(0.0)):
        assert torch.equal(video(pipe, req, cache), uncached)
        assert cache.last_stats["skipped"] == 0 and cache.last_stats["computed"] == 16
        assert cache.last_stats["blocks_run"] == 16 * len(pipe.experts[0].blocks)
    assert all(e.block_runner is None for e in pipe.experts)


def test_skipping_changes_the_video_a_little(t2v_pipe):
    req = request(t2v_pipe, sample_steps=12)
    uncached = video(t2v_pipe, req)
    flat = table([1.0] + [0.995] * 11)  # the tiny model's own ratios are far from 1: script gentle ones
    cache = MagCache(flat, threshold=0.06, retention=0.2, retention_rule="t2v")
    cached = video(t2v_pipe, req, cache)
    assert cache.last_stats["skipped"] > 0
    assert 0 < (cached - uncached).abs().max() < 1.0


def test_one_cache_serves_generations_of_different_sizes(t2v_pipe):
    cache = MagCache(table([1.0] + [0.995] * 7), threshold=0.06, retention=0.0)
    video(t2v_pipe, request(t2v_pipe), cache)
    again = video(t2v_pipe, request(t2v_pipe, size=(128, 64)), cache)
    fresh = video(t2v_pipe, request(t2v_pipe, size=(128, 64)),
                  MagCache(table([1.0] + [0.995] * 7), threshold=0.06, retention=0.0))
    assert torch.equal(again, fresh) and cache.last_stats["skipped"] > 0


def test_a_cancelled_run_removes_the_cache(t2v_pipe):
    req = request(t2v_pipe)
    ctx, ctx_null = t2v_pipe.encode_prompts(req.prompt, req.negative_prompt)

    seen = []

    def cancel(step, total, entry):
        seen.append(cache.current.stats()["evaluations"])  # live counters, for a progress line
        if step == 3:
            raise wanx.Cancelled

    cache = MagCache(table([1.0] * 8), threshold=0.06)
    with pytest.raises(wanx.Cancelled), torch.no_grad():
        run_plan(t2v_pipe.plan(req), t2v_pipe.initial_noise(req, req.latent_grid),
                 t2v_pipe.prepare_condition(req), t2v_pipe.experts, t2v_pipe.residency, ctx, ctx_null,
                 callback=cancel, cache=cache)
    assert all(e.block_runner is None for e in t2v_pipe.experts)
    assert cache.last_stats["evaluations"] == 6 and seen == [2, 4, 6]  # 3 steps x 2 branches, then the stop
    assert cache.current is None
