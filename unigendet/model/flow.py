"""Rectified flow: interpolant, timestep sampling, velocity target and loss, Euler sampler, CFG. No parameters.

Time convention (stated once): **t = 0 is data, t = 1 is pure noise.**
    x_t = (1 - t) x0 + t eps,        velocity v = dx_t/dt = eps - x0.
Training draws raw n ~ N(0, 1), t = sigmoid(n), then shifts t <- s t / (1 + (s - 1) t) (s = 1 in training).
Clean condition images carry raw = -inf, i.e. t = 0. Sampling integrates from t = 1 to 0 with Euler steps on
a shifted ``linspace(1, 0, N)`` (s = 3 at inference): x <- x - v dt.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#####################################################################################################
# Training
#####################################################################################################


def shift_time(t: Tensor, shift: float) -> Tensor:
    """t <- s t / (1 + (s - 1) t); s > 1 moves mass toward noise."""
    return shift * t / (1 + (shift - 1) * t)


def time_from_raw(raw: Tensor, shift: float) -> Tensor:
    """Raw (logit-normal) timesteps -> t in [0, 1]. raw = -inf gives exactly 0 (a clean image)."""
    return shift_time(torch.sigmoid(raw), shift)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t for per-row t: x0, noise (N, C), t (N,)."""
    return (1 - t[:, None]) * x0 + t[:, None] * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def flow_mse(pred: Tensor, target: Tensor) -> Tensor:
    """Per-token, per-channel squared error (N, C); reduce with ``reduce_flow``."""
    return (pred - target) ** 2


def reduce_flow(mse: Tensor) -> Tensor:
    """Mean over channels, then over tokens (the reference's reduction). Empty -> 0 with a graph."""
    if mse.numel() == 0:
        return mse.sum()
    return mse.mean(-1).mean()


#####################################################################################################
# Sampling
#####################################################################################################


def sample_schedule(steps: int, shift: float, device: torch.device | str = "cpu") -> Tensor:
    """The ``steps`` times visited from 1 to 0 (inclusive), shifted."""
    if steps < 2:
        raise ValueError("the Euler schedule needs at least 2 points (1 step)")
    return shift_time(torch.linspace(1.0, 0.0, steps, device=device), shift)


def cfg_combine(v_cond: Tensor, v_uncond: Tensor, scale: float, renorm_min: float = 0.0) -> Tensor:
    """Classifier-free guidance. With ``renorm_min`` > 0 the guided velocity's norm is capped at the
    conditional one's (global renorm over one image's tokens), scaled down by no more than ``renorm_min``.
    Inputs are (N, C) for one image or (B, N, C) for a batch (renormalised image by image)."""
    v = v_uncond + scale * (v_cond - v_uncond)
    if renorm_min > 0:
        dims = tuple(range(v.dim() - 2, v.dim()))
        norm = lambda t: t.pow(2).sum(dims, keepdim=True).sqrt()  # noqa: E731
        ratio = (norm(v_cond) / (norm(v) + 1e-8)).clamp(min=renorm_min, max=1.0)
        v = v * ratio
    return v


def euler_sample(velocity: Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor | None]], x: Tensor, steps: int,
                 shift: float, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
                 renorm_min: float = 0.0) -> Tensor:
    """Integrate from t = 1 (x is noise) to t = 0.

    Args:
        velocity: ``(x_t, t, want_uncond) -> (v_cond, v_uncond or None)``; t is a 0-d tensor. It is asked for the
            unconditional velocity only where guidance applies (cfg_scale != 1 and t inside ``cfg_interval``).
        x: (N, C) noise tokens of one image, or (B, N, C) of a batch.
    """
    ts = sample_schedule(steps, shift, x.device)
    lo, hi = cfg_interval
    for i in range(steps - 1):
        t, dt = ts[i], ts[i] - ts[i + 1]
        guided = cfg_scale != 1.0 and lo <= float(t) <= hi
        v_cond, v_uncond = velocity(x, t, guided)
        v = cfg_combine(v_cond, v_uncond, cfg_scale, renorm_min) if guided else v_cond
        x = x - v * dt
    return x
