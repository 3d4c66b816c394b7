"""Schedules, samplers and guidance: official schedule values, step-by-step parity with diffusers'
schedulers on a trajectory-dependent fake model, convergence on an exactly solvable flow, dtype rules,
and the A14B expert switch. Run with ``-s`` to see the per-configuration error table."""

import math

import numpy as np
import pytest
import torch

from wanx.sampling import (
    DPMPPSampler,
    EulerSampler,
    UniPCSampler,
    cfg,
    dpmpp_schedule,
    euler_schedule,
    build_plan,
    is_high_noise,
    make_sampler,
    shift_sigmas,
    unipc_schedule,
)

diffusers = pytest.importorskip("diffusers")

# diffusers' DPM++ builds its unused beta table through a numpy-2-deprecated __array__ path.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TOL = 1e-5  # per-step max relative error allowed against diffusers (float32)
SHAPES = [(1, 16, 3, 4, 6), (2, 4, 2, 3, 5)]  # [B, C, T, H, W], batch 1 and 2
CONFIGS = [(1, 5.0), (2, 3.0), (3, 1.0), (7, 5.0), (40, 12.0), (50, 5.0)]  # (steps, shift)


def fake_velocity(x: torch.Tensor, t) -> torch.Tensor:
    """A smooth deterministic 'model' of x and t, so its outputs follow each solver's trajectory."""
    tt = float(t) / 1000.0
    return 0.9 * torch.tanh(1.3 * x + tt) - 0.4 * x * (1.0 - tt) + 0.2 * torch.sin(3.0 * x) * tt


def _noise(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _run_pair(ours, ref, ref_timesteps, shape, seed=0):
    """Drive our sampler and a diffusers scheduler with the same fake model; max per-step relative error."""
    ref.set_begin_index(0)
    x_ours = x_ref = _noise(shape, seed)
    worst = 0.0
    for t in ref_timesteps:
        x_ref = ref.step(fake_velocity(x_ref, t), t, x_ref, return_dict=False)[0]
        x_ours = ours.step(fake_velocity(x_ours, t), x_ours)
        assert x_ours.dtype == x_ref.dtype and x_ours.shape == x_ref.shape
        worst = max(worst, _rel(x_ours, x_ref))
    return worst, x_ours


# ------------------------------------------------------------------------------------ schedules
def test_shift_formula():
    s = np.array([0.0, 0.25, 0.5, 1.0])
    np.testing.assert_allclose(shift_sigmas(s, 3.0), [0.0, 0.5, 0.75, 1.0])
    assert shift_sigmas(0.5, 1.0) == 0.5
    t = torch.tensor([0.1, 0.9], dtype=torch.float32)
    assert shift_sigmas(t, 5.0).dtype == torch.float32


@pytest.mark.parametrize("steps,shift,first,last", [
    (40, 12.0, [999, 997, 995, 993, 990], [492, 386, 235]),  # t2v-A14B
    (40, 5.0, [999, 994, 989, 983, 978], [288, 208, 113]),  # i2v-A14B
    (50, 5.0, [999, 995, 991, 987, 982], [241, 172, 92]),  # ti2v-5B
])
def test_unipc_schedule_matches_spec_examples(steps, shift, first, last):
    sigmas, timesteps = unipc_schedule(steps, shift)
    assert timesteps.dtype == torch.int64 and sigmas.dtype == torch.float32
    assert len(timesteps) == steps and len(sigmas) == steps + 1
    assert timesteps[:5].tolist() == first and timesteps[-3:].tolist() == last
    assert sigmas[-1].item() == 0.0 and bool((sigmas[1:] < sigmas[:-1]).all())


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (4, 3.0), (40, 12.0), (40, 5.0), (50, 5.0), (13, 7.5)])
def test_official_schedules_follow_the_formula(steps, shift):
    """Written out in plain Python: UniPC from σ=0.999 (float32), DPM++ from σ=1, t = int(σ·1000)."""
    s_max = float(np.float32(0.999))
    for fn, start, span in [(unipc_schedule, s_max, s_max), (dpmpp_schedule, 1.0, 1.0)]:
        sigmas, timesteps = fn(steps, shift)
        want = [shift * u / (1 + (shift - 1) * u) for u in (start - span * k / steps for k in range(steps))]
        np.testing.assert_allclose(sigmas[:-1].double().numpy(), want, rtol=1e-7)
        for t, w in zip(timesteps.tolist(), want):  # truncated, never rounded
            near = round(w * 1000)
            if abs(w * 1000 - near) > 1e-6:
                assert t == math.floor(w * 1000)
            else:  # an exact integer in theory: the last float64 bit decides (see the next test)
                assert t in (near - 1, near)
        assert sigmas[-1].item() == 0.0
    # parity quirk: UniPC starts just below 1 (t=999), DPM++ exactly at 1 (t=1000)
    assert unipc_schedule(steps, shift)[1][0].item() == 999
    sigmas, timesteps = dpmpp_schedule(steps, shift)
    assert timesteps[0].item() == 1000 and sigmas[0].item() == 1.0


def test_int_truncation_not_rounding():
    # parity: float64 σ·1000 just below an integer is truncated: 0.4·1000 = 399.99999999999994 -> 399.
    assert dpmpp_schedule(10, 1.0)[1].tolist() == [1000, 900, 800, 700, 600, 500, 399, 299, 199, 99]
    _, t = unipc_schedule(40, 12.0)
    exact = shift_sigmas(np.linspace(float(np.float32(0.999)), 0, 41)[:-1], 12.0) * 1000
    assert torch.equal(t, torch.from_numpy(np.floor(exact)).to(torch.int64))
    assert (exact - t.numpy() > 0.5).any()  # some of them would round up


def test_diffusers_unipc_schedule_differs_only_by_its_start():
    """diffusers' default flow UniPC list starts at 1 − 1e-6 and spans linspace(1, 1/1000); fed the
    official unshifted list through `sigmas=` it reproduces the official schedule exactly."""
    from diffusers import UniPCMultistepScheduler

    for steps, shift in [(40, 12.0), (40, 5.0), (50, 5.0), (4, 3.0)]:
        d = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                    num_train_timesteps=1000)
        d.set_timesteps(steps)
        assert abs(d.sigmas[0].item() - (1 - 1e-6)) < 1e-7  # the diffusers nudge
        ours_sigmas, ours_t = unipc_schedule(steps, shift)
        assert ours_sigmas[0].item() < d.sigmas[0].item()
        d.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1])
        assert torch.equal(d.sigmas, ours_sigmas) and torch.equal(d.timesteps, ours_t)


def test_euler_schedule_matches_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps, shift in CONFIGS:
        d = FlowMatchEulerDiscreteScheduler(shift=shift)
        d.set_timesteps(steps)
        sigmas, timesteps = euler_schedule(steps, shift)
        assert timesteps.dtype == torch.float32  # float, not truncated
        assert torch.equal(sigmas, d.sigmas) and torch.equal(timesteps, d.timesteps)


# --------------------------------------------------------------------- step parity with diffusers
def _diffusers_unipc(shift):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                   flow_shift=shift, solver_order=2, solver_type="bh2",
                                   lower_order_final=True, final_sigmas_type="zero", num_train_timesteps=1000)


def _diffusers_dpmpp(shift):
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=shift, algorithm_type="dpmsolver++", solver_type="midpoint",
                                       solver_order=2, lower_order_final=True, final_sigmas_type="zero",
                                       num_train_timesteps=1000)


@pytest.mark.parametrize("shape", SHAPES)
def test_unipc_matches_diffusers(shape):
    for steps, shift in CONFIGS:
        # (a) the official schedule, given to diffusers as explicit unshifted sigmas
        d = _diffusers_unipc(shift)
        d.set_timesteps(sigmas=np.linspace(float(np.float32(0.999)), 0, steps + 1)[:-1])
        ours = make_sampler("unipc", steps, shift)
        err_a, _ = _run_pair(ours, d, d.timesteps, shape)
        # (b) diffusers' own nudged schedule, given to our sampler
        d = _diffusers_unipc(shift)
        d.set_timesteps(steps)
        err_b, _ = _run_pair(UniPCSampler(d.sigmas, d.timesteps), d, d.timesteps, shape)
        print(f"unipc {shape} steps={steps} shift={shift}: max rel err {err_a:.2e} (official sched), "
              f"{err_b:.2e} (diffusers sched)")
        assert err_a <= TOL and err_b <= TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_dpmpp_matches_diffusers(shape):
    """diffusers' flow DPM++ cannot take sigmas and starts at shift(0.999), not the official 1.0. So
    (a) our update on diffusers' sigma list, and (b) diffusers with its table replaced by the official
    one (σ_0 = 1, λ_0 = −inf), against our default sampler."""
    for steps, shift in CONFIGS:
        d = _diffusers_dpmpp(shift)
        d.set_timesteps(steps)
        assert d.sigmas[0].item() < 1.0
        err_a, _ = _run_pair(DPMPPSampler(d.sigmas, d.timesteps), d, d.timesteps, shape)
        d = _diffusers_dpmpp(shift)
        d.set_timesteps(steps)
        d.sigmas, d.timesteps = dpmpp_schedule(steps, shift)
        ours = make_sampler("dpm++", steps, shift)
        err_b, _ = _run_pair(ours, d, ours.timesteps, shape)
        print(f"dpm++ {shape} steps={steps} shift={shift}: max rel err {err_a:.2e} (diffusers sched), "
              f"{err_b:.2e} (official sched)")
        assert err_a <= TOL and err_b <= TOL


@pytest.mark.parametrize("shape", SHAPES)
def test_euler_matches_diffusers(shape):
    from diffusers import FlowMatchEulerDiscreteScheduler

    for steps, shift in CONFIGS:
        d = FlowMatchEulerDiscreteScheduler(shift=shift)
        d.set_timesteps(steps)
        err, _ = _run_pair(make_sampler("euler", steps, shift), d, d.timesteps, shape)
        print(f"euler {shape} steps={steps} shift={shift}: max rel err {err:.2e}")
        assert err <= TOL


# --------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_exact_flow_reaches_the_data_point(name):
    """For data concentrated at one point x*, v = (x − x*)/σ exactly; every solver must land on x*."""
    target = _noise((2, 3, 2, 4, 4), seed=1)
    s = make_sampler(name, 10, 5.0)
    x = _noise(target.shape, seed=2)
    for i in range(len(s)):
        x = s.step((x - target) / s.sigmas[i], x)
    assert _rel(x, target) < 1e-5


def _gauss_error(cls, n, mu=0.7, std=0.5):
    """Integrate the exact velocity of N(mu, std²) data from σ=0.9 to 0.1; max error vs the exact ODE map."""
    def exact(sig, z):
        return (1 - sig) * mu + math.sqrt((1 - sig) ** 2 * std ** 2 + sig ** 2) * z

    z = torch.randn(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sig = torch.linspace(0.9, 0.1, n + 1, dtype=torch.float64)
    s = cls(sig, (sig[:-1] * 1000).long())
    x = exact(s.sigmas[0].item(), z)
    for i in range(n):
        sg = s.sigmas[i].item()
        a = 1 - sg
        x0 = mu + a * std ** 2 / (a * a * std ** 2 + sg * sg) * (x - a * mu)
        x = s.step((x - x0) / sg, x)
    return (x - exact(s.sigmas[-1].item(), z)).abs().max().item()


def test_convergence_orders():
    """Euler is first order; the multistep solvers are (at least) second order and far more accurate."""
    for cls, lo, hi in [(EulerSampler, 1.8, 2.2), (UniPCSampler, 3.5, 100), (DPMPPSampler, 3.5, 100)]:
        e8, e16, e32 = (_gauss_error(cls, n) for n in (8, 16, 32))
        print(f"{cls.name}: error 8/16/32 steps {e8:.2e} {e16:.2e} {e32:.2e}")
        assert lo < e8 / e16 < hi and lo < e16 / e32 < hi
    assert _gauss_error(UniPCSampler, 16) < _gauss_error(EulerSampler, 16) / 5
    assert _gauss_error(DPMPPSampler, 16) < _gauss_error(EulerSampler, 16) / 5


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_last_step_returns_x0(name):
    s = make_sampler(name, 6, 5.0)
    x = _noise((1, 4, 2, 3, 3))
    for t in s.timesteps[:-1]:
        x = s.step(fake_velocity(x, t), x)
    v = fake_velocity(x, s.timesteps[-1])
    out = s.step(v, x)
    assert torch.equal(out, x - s.sigmas[-2] * v)


@pytest.mark.parametrize("name", ["unipc", "dpm++", "euler"])
def test_shape_agnostic_batch_and_reset(name):
    """Element-wise solvers: batch 2 == two batches of 1 == a flat vector; reset() replays exactly."""
    s = make_sampler(name, 8, 5.0)
    x = _noise((2, 4, 2, 3, 5), seed=3)

    def run(x):
        s.reset()
        for t in s.timesteps:
            x = s.step(fake_velocity(x, t), x)
        return x

    both = run(x)
    assert torch.equal(both, run(x))  # reset() really resets
    assert torch.equal(both[:1], run(x[:1])) and torch.equal(both[1:], run(x[1:]))
    assert torch.equal(both.flatten(), run(x.flatten()))
    assert torch.equal(both[0], run(x[0]))  # [C, T, H, W], the official unbatched latent
    with pytest.raises(RuntimeError):
        s.step(x, x)  # all steps done


def test_dtype_rules():
    """UniPC keeps the sample dtype; DPM++ returns x0's (promoted) dtype; Euler the promoted dtype."""
    x32, x16 = _noise((1, 2, 2, 2, 2)), _noise((1, 2, 2, 2, 2)).bfloat16()
    cases = [("unipc", x16, torch.float32, torch.bfloat16), ("unipc", x32, torch.bfloat16, torch.float32),
             ("dpm++", x16, torch.float32, torch.float32), ("dpm++", x16, torch.bfloat16, torch.bfloat16),
             ("dpm++", x32, torch.bfloat16, torch.float32), ("euler", x32, torch.bfloat16, torch.float32),
             ("euler", x16, torch.bfloat16, torch.bfloat16)]
    for name, x, vdtype, want in cases:
        s = make_sampler(name, 3, 5.0)
        for t in s.timesteps:
            x = s.step(fake_velocity(x.float(), t).to(vdtype), x)
            assert x.dtype == want, (name, vdtype)


def test_make_sampler_interface():
    for name, cls, tdtype, t0 in [("unipc", UniPCSampler, torch.int64, 999),
                                   ("dpm++", DPMPPSampler, torch.int64, 1000),
                                   ("euler", EulerSampler, torch.float32, 1000.0)]:
        s = make_sampler(name, 12, 5.0)
        assert isinstance(s, cls) and len(s) == 12 and s.step_index == 0
        assert s.timesteps.dtype == tdtype and s.timesteps[0].item() == t0
        assert s.sigmas.dtype == torch.float32 and len(s.sigmas) == 13 and s.sigmas[-1].item() == 0.0
    with pytest.raises(ValueError):
        make_sampler("ddim", 10, 5.0)
    with pytest.raises(ValueError):
        make_sampler("unipc", 0, 5.0)
    with pytest.raises(ValueError):
        make_sampler("euler", 3, 5.0).step(torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------------------------- guidance
def test_cfg():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    assert torch.equal(cfg(c, u, 1.0), c)
    assert torch.equal(cfg(c, u, 0.0), u)
    assert torch.allclose(cfg(c, u, 4.0), torch.tensor([2.5, 11.0]))


@pytest.mark.parametrize("solver", ["unipc", "dpm++"])
@pytest.mark.parametrize("shift,boundary,n_high", [(12.0, 0.875, 26), (5.0, 0.900, 15)])
def test_expert_switch_defaults(solver, shift, boundary, n_high):
    """Spec §5: t2v (40 steps, shift 12, boundary .875) gives the high-noise expert 26 steps, i2v 15."""
    plan = build_plan(solver, 40, shift, (3.0, 4.0), boundary, num_experts=2)
    assert [s.expert for s in plan] == [0] * n_high + [1] * (40 - n_high)
    scales = [s.guide_scale for s in plan]
    assert scales == [4.0] * n_high + [3.0] * (40 - n_high)  # official tuple order: (low, high)
    s = make_sampler(solver, 40, shift)
    assert all(torch.equal(p.timestep, t) for p, t in zip(plan, s.timesteps))
    assert [p.sigma for p in plan] == s.sigmas[:-1].tolist() and plan.steps[-1].sigma_next == 0.0


def test_expert_boundary_edges():
    assert is_high_noise(875, 0.875) and not is_high_noise(torch.tensor(874), 0.875)
    assert is_high_noise(torch.tensor([900]), 0.9) and not is_high_noise(874.9, 0.875)
    assert not is_high_noise(950, None)


def test_plan_for_one_expert_and_guidance_one():
    plan = build_plan("euler", 4, 5.0, (5.0, 5.0), None, num_experts=1)
    assert [s.expert for s in plan] == [0] * 4 and all(s.guide_scale == 5.0 and s.uncond for s in plan)
    assert plan.steps[0].timestep.dtype == torch.float32  # Euler keeps float timesteps
    plan = build_plan("unipc", 4, 5.0, (1.0, 1.0), 0.9, num_experts=2)
    assert not any(s.uncond for s in plan)  # guidance 1: no unconditional pass
    assert plan.steps[0].describe()["expert"] == "high" and plan.experts_used == (0, 1)
