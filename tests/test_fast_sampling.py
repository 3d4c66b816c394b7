"""Distilled few-step sampling: the 4-step Lightning recipe, explicit timesteps, step-index expert
switch and a real-guidance first phase, on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

import wanx
from wanx.errors import InputError
from wanx.sampling import build_plan
from wanx.testing import build_tiny_checkpoint


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return wanx.load_pipeline(build_tiny_checkpoint(tmp_path_factory.mktemp("fast") / "t2v", "t2v-A14B", seed=4),
                              device="cpu")


def _spy(pipe, monkeypatch):
    calls = []
    for name, model in zip(("high", "low"), pipe.experts):
        forward = model.forward

        def wrapped(x, t, c, f=forward, n=name, **kw):
            calls.append((n, t.flatten()[0].item(), x.shape[0]))
            return f(x, t, c, **kw)
        monkeypatch.setattr(model, "forward", wrapped)
    return calls


def _gen(pipe, **kw):
    return pipe.generate("a red circle moving left", size=(64, 64), frame_num=5, seed=7, **kw)


def test_lightning_plan_is_the_published_recipe():
    plan = build_plan("flow_euler", 4, 5.0, (1.0, 1.0), 0.875, num_experts=2)
    assert [s.sigma for s in plan] + [plan.steps[-1].sigma_next] == pytest.approx([1, .9375, 5 / 6, .625, 0])
    assert [s.timestep.item() for s in plan] == pytest.approx([1000, 937.5, 833.3333, 625], abs=1e-3)
    assert [s.timestep.dtype for s in plan] == [torch.float32] * 4  # never rounded to integers
    assert [s.expert for s in plan] == [0, 0, 1, 1] and not any(s.uncond for s in plan)


def test_lightning_recipe_runs_four_single_passes(pipe, monkeypatch):
    calls = _spy(pipe, monkeypatch)
    video = _gen(pipe, recipe="lightning")
    assert [(n, b) for n, _, b in calls] == [("high", 1), ("high", 1), ("low", 1), ("low", 1)]  # no uncond pass
    assert [t for _, t, _ in calls] == pytest.approx([1000, 937.5, 833.3333, 625], abs=1e-3)
    assert video.metadata["recipe"] == "lightning" and video.metadata["sample_solver"] == "flow_euler"
    assert video.metadata["sample_steps"] == 4 and video.metadata["sample_guide_scale"] == [1.0, 1.0]


def test_lightning_matches_a_plain_euler_loop(pipe):
    video = _gen(pipe, recipe="lightning")
    req = pipe.resolve("a red circle moving left", size=(64, 64), frame_num=5, seed=7, recipe="lightning")
    ctx, _ = pipe.encode_prompts(req.prompt, req.negative_prompt)
    x = pipe.initial_noise(req, req.latent_grid)
    s = torch.linspace(1, 0, 5)  # float32, shifted by 5: 1, .9375, .8333, .625, 0
    sigmas = 5 * s / (1 + 4 * s)
    with torch.no_grad():
        for i, expert in enumerate((0, 0, 1, 1)):  # x <- x + (sigma_next - sigma) v, v at t = 1000 sigma
            t = (1000 * sigmas[i]).reshape(1)
            v = pipe.experts[expert](x, t, ctx.context, context_lens=ctx.lengths)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        ref = pipe.decode(x)
    err = ((video.tensor - ref).abs().max() / ref.abs().max()).item()
    print(f"lightning vs reference Euler loop: max rel err {err:.2e}")
    assert err <= 1e-6


def test_overrides_boundary_step_and_real_guidance_phase(pipe, monkeypatch):
    calls = _spy(pipe, monkeypatch)
    _gen(pipe, recipe="lightning", boundary_step=1, cfg_first_steps=1, cfg_first_scale=3.5)
    assert [(n, b) for n, _, b in calls] == [("high", 2), ("low", 1), ("low", 1), ("low", 1)]
    calls.clear()
    _gen(pipe, recipe="lightning", sample_steps=6, sample_shift=3.0)  # explicit flags override the preset
    assert len(calls) == 6 and calls[1][1] == pytest.approx(1000 * 3 * (5 / 6) / (1 + 2 * (5 / 6)), abs=1e-3)


def test_explicit_timesteps(pipe, monkeypatch):
    calls = _spy(pipe, monkeypatch)
    video = _gen(pipe, timesteps=[1000, 900.5, 500], guide_scale=1.0)
    assert [t for _, t, _ in calls] == pytest.approx([1000, 900.5, 500])
    assert video.metadata["timesteps"] == [1000.0, 900.5, 500.0] and video.metadata["sample_steps"] == 3


@pytest.mark.parametrize("kwargs,argument,words", [
    (dict(recipe="turbo"), "recipe", "unknown"),
    (dict(timesteps=[500, 900]), "timesteps", "strictly decreasing"),
    (dict(timesteps=[1000, 0]), "timesteps", "(0, 1000]"),
    (dict(timesteps=[1000, 500], sample_solver="unipc"), "timesteps", "Euler solver"),
    (dict(timesteps=[1000, 500], sample_steps=3), "timesteps", "lists 2 steps"),
    (dict(boundary_step=9, sample_steps=4), "boundary_step", "[0, 4]"),
    (dict(boundary_step=2, boundary=0.5), "boundary_step", "not both"),
    (dict(cfg_first_steps=5, recipe="lightning"), "cfg_first_steps", "[0, 4]"),
    (dict(cfg_first_scale=3.0), "cfg_first_scale", "cfg_first_steps"),
])
def test_bad_schedule_settings_are_refused(pipe, kwargs, argument, words):
    with pytest.raises(InputError) as e:
        pipe.resolve("x", size=(64, 64), **kwargs)
    assert e.value.argument == argument and words in str(e.value)
