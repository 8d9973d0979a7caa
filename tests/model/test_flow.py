"""flow.py against analytic velocity fields, no network."""

from __future__ import annotations

import math

import pytest
import torch

from unigendet.model import flow


def test_time_from_raw_matches_the_reference_formula():
    raw = torch.tensor([float("-inf"), -2.0, 0.0, 1.5])
    for s in (1.0, 3.0):
        t = flow.time_from_raw(raw, s)
        sig = 1 / (1 + torch.exp(-raw))
        assert torch.allclose(t, s * sig / (1 + (s - 1) * sig))
        assert t[0] == 0.0  # a clean image
    assert flow.time_from_raw(torch.tensor([0.0]), 3.0).item() == pytest.approx(0.75)  # 3*0.5/(1+2*0.5)


def test_interpolant_and_target():
    x0, eps = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt = flow.interpolate(x0, eps, t)
    assert torch.equal(xt[0], x0[0]) and torch.equal(xt[-1], eps[-1])
    v = flow.velocity_target(x0, eps)
    # d/dt x_t = eps - x0: a finite difference of the interpolant agrees
    h = 1e-3
    fd = (flow.interpolate(x0, eps, t + h) - xt) / h
    assert torch.allclose(fd, v, atol=1e-3)


def test_reduce_flow_is_mean_over_channels_then_tokens():
    mse = torch.tensor([[1.0, 3.0], [5.0, 7.0], [0.0, 0.0]])
    assert flow.reduce_flow(mse).item() == pytest.approx((2 + 6 + 0) / 3)
    assert flow.reduce_flow(torch.zeros(0, 2)).item() == 0.0


def test_schedule_endpoints_and_shift():
    ts = flow.sample_schedule(5, 1.0)
    assert torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = flow.sample_schedule(5, 3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert (shifted[1:-1] > ts[1:-1]).all()  # a shift > 1 spends more steps near noise
    with pytest.raises(ValueError):
        flow.sample_schedule(1, 1.0)


@pytest.mark.parametrize("shift,steps", [(1.0, 2), (3.0, 7), (3.0, 50)])
def test_euler_recovers_a_point_mass_exactly(shift, steps):
    """Data = a single point c: the exact velocity is v(x, t) = (x - c) / t, for which every Euler step is exact."""
    c = torch.tensor([[0.3, -1.2, 2.0]])
    x1 = torch.randn(4, 3)

    def velocity(x, t, want_uncond):
        return (x - c) / t, None

    out = flow.euler_sample(velocity, x1, steps, shift)
    assert torch.allclose(out, c.expand_as(out), atol=1e-5)


def test_euler_on_a_gaussian_matches_the_ode_solution():
    """Data ~ N(0, s0^2): the exact marginal velocity is linear in x; fine Euler steps land near the exact map
    x1 -> x1 * s0 (the OT map of the rectified flow between N(0,1) and N(0, s0^2))."""
    s0 = 0.5
    x1 = torch.randn(2000, 1, dtype=torch.float64)

    def velocity(x, t, want_uncond):
        # x_t = (1-t) x0 + t eps: Var = (1-t)^2 s0^2 + t^2; E[eps - x0 | x_t] = x_t (t - (1-t) s0^2) / Var
        var = (1 - t) ** 2 * s0**2 + t**2
        return x * (t - (1 - t) * s0**2) / var, None

    errors = [((flow.euler_sample(velocity, x1, n, 1.0) - x1 * s0).abs() / x1.abs()).max().item() for n in (100, 400)]
    assert errors[1] < 3e-3
    assert 3.0 < errors[0] / errors[1] < 5.0  # first-order convergence: 4x the steps, ~1/4 the error


def test_cfg_combination_and_interval():
    cond, uncond = torch.full((2, 3), 2.0), torch.ones(2, 3)
    assert torch.allclose(flow.cfg_combine(cond, uncond, 4.0), torch.full((2, 3), 5.0))
    renormed = flow.cfg_combine(cond, uncond, 4.0, renorm_min=0.0001)
    assert math.isclose(renormed.norm().item(), cond.norm().item(), rel_tol=1e-5)
    # batched: each image is renormalised on its own, so an image's result does not depend on its batch
    batch_cond = torch.stack([cond, 10 * cond])
    batch = flow.cfg_combine(batch_cond, torch.stack([uncond, uncond]), 4.0, renorm_min=0.0001)
    assert torch.allclose(batch[0], renormed)
    assert math.isclose(batch[1].norm().item(), (10 * cond).norm().item(), rel_tol=1e-5)
    calls = []

    def velocity(x, t, want_uncond):
        calls.append((round(float(t), 3), want_uncond))
        return torch.zeros_like(x), (torch.zeros_like(x) if want_uncond else None)

    flow.euler_sample(velocity, torch.zeros(1, 1), 5, 1.0, cfg_scale=3.0, cfg_interval=(0.3, 0.8))
    assert calls == [(1.0, False), (0.75, True), (0.5, True), (0.25, False)]
    calls.clear()
    flow.euler_sample(velocity, torch.zeros(1, 1), 3, 1.0, cfg_scale=1.0)
    assert all(not want for _, want in calls)
