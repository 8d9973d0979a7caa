"""Four hand-written image generators for the embedded demo corpus, each leaving its own forensic traces.

No learned weights: every generator is a few lines of numpy/scipy driven by a ``numpy.random.Generator``, so the
corpus is byte-identical for a given seed. Features:

* ``gan_upsample``   - a GAN-like decoder: a real crop is reduced to a low-resolution "latent" and decoded by 1-3
                       transposed-convolution stages (zero insertion + random, slightly unbalanced kernels + noise
                       injection). The uneven kernel overlap prints the checkerboard of Odena et al. 2016
                       (https://distill.pub/2016/deconv-checkerboard/): periodic peaks at 1/2, 1/4, 1/8 of the
                       sampling frequency, strongest inside a random blob of the frame.
* ``spectral``       - random-phase synthesis with a natural 1/f amplitude spectrum (random slope and anisotropy),
                       coloured by the mean and covariance of a real crop: right global statistics, but Gaussian
                       gradients, no edges or objects, a periodic (wrap-around) frame, and a faint period-4 grid
                       (spectral peaks at 1/4 of the sampling frequency on the axes, the kind of fingerprint
                       Frank et al. 2020 and Corvi et al. 2023 find in generated images).
* ``diffusion_like`` - an iterative denoise-from-noise loop (blur + unsharp "denoiser", pull toward a coarse layout
                       of a real crop, decreasing noise schedule, Perona-Malik smoothing) that ends with waxy
                       plateaus, a uniform, content-independent grain and the latent decoder's faint grid (period 4,
                       peaks on the diagonals).
* ``splice``         - copy-move / splice composites of two real crops: a pasted rectangle or ellipse with a colour
                       and brightness mismatch, a resampled donor whose interpolation leaves a two-pixel periodic
                       residue inside the region (Popescu & Farid 2005), blurred / re-noised / sharpened or not, and
                       a hard or barely feathered seam.

Every generator returns a :class:`FakeResult` (uint8 ``(H, W, 3)`` image + an ``info`` dict of what it did); the
explanations in :mod:`unigendet.demo.explain` are written from measurements of the pixels, using ``info`` only to name
what the measurements point at (e.g. the splice mask).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

FAMILIES = ("gan_upsample", "spectral", "diffusion_like", "splice")
"""Fake family names, used as the FakeClue ``cate`` of the fakes (the real images use ``"real"``)."""

_LUMA = np.array([0.299, 0.587, 0.114])

# Trace strengths, drawn per image from these ranges (one place to tune them; docs/demo_corpus.md describes them).
GAN_IMBALANCE = (0.2, 0.35)  # relative gap between the even and odd tap sums of the transposed convolutions
GAN_BLOB_FLOOR = 0.75  # weight of the checkerboard decode outside the artifact blob (1 = the whole frame)
SPECTRAL_BETA = (0.85, 1.35)  # amplitude-spectrum slope of the random-phase synthesis
DIFFUSION_GRAIN = (0.025, 0.06)  # sigma of the final grain, as a fraction of the range
SPLICE_SIDE = (0.5, 0.75)  # side of the pasted region, as a fraction of the host's
SPLICE_GAIN = (0.1, 0.25)  # brightness mismatch of the pasted region
SPLICE_TREATMENTS = ("blur", "noise", "sharpen", "none")  # what is done to the donor region (drawn uniformly)
SPLICE_NOISE = (0.015, 0.04)  # sigma of a re-noised donor
SPLICE_SCALE = (-0.35, 0.35)  # log of the donor region's resampling factor (donor side / pasted side)
SPLICE_GRID = (0.03, 0.05)  # amplitude of the periodic interpolation residue of the resampled donor region
SPLICE_GRID_PERIOD = 2  # its period in pixels
SPECTRAL_GRID = (0.03, 0.05)  # amplitude (fraction of the range) of the period-4 grid of the synthesis' spectral peaks
DIFFUSION_GRID = (0.015, 0.03)  # amplitude of the latent decoder's periodic grid (0: none)
DIFFUSION_GRID_PERIOD = 4  # its period in pixels (peaks on the diagonals at 1 / period)
CAMERA_NOISE = (0.03, 0.09)  # sigma at full brightness of the shot noise given to every real crop ((0, 0): none)
CAMERA_CHROMA = 0.0  # weight of a per-channel part of that noise (the shared, luminance part weighs 0.85)


@dataclass
class FakeResult:
    image: np.ndarray  # (H, W, 3) uint8
    info: dict[str, Any] = field(default_factory=dict)


########################################################################################################################
# Helpers


def to_float(img: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> float64 in [0, 1]."""
    return img.astype(np.float64) / 255.0


def to_uint8(x: np.ndarray) -> np.ndarray:
    """float image in [0, 1] (clipped) -> uint8, rounding half up so results do not depend on the numpy version."""
    return np.floor(np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def gray_rgb(x: np.ndarray) -> np.ndarray:
    """Luminance replicated on three channels (float in, float out)."""
    y = x @ _LUMA
    return np.repeat(y[..., None], 3, axis=-1)


def is_gray(img: np.ndarray) -> bool:
    """True when the three channels are equal (a grayscale photo stored as RGB)."""
    return bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


def resize(img: np.ndarray, hw: tuple[int, int], resample: int = Image.BOX) -> np.ndarray:
    """Resize a uint8 ``(H, W, 3)`` image to ``hw = (height, width)`` with PIL."""
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), resample=resample))


def camera_noise(img: np.ndarray, rng: np.random.Generator,
                 sigma_range: tuple[float, float] | None = None) -> np.ndarray:
    """Sensor-like noise on a uint8 photo crop: shot noise (variance proportional to the brightness), shared by the
    three channels (luminance noise, as after demosaicking and denoising; ``CAMERA_CHROMA`` adds a per-channel part),
    grayscale kept grayscale.

    Real photographs carry such noise; giving it to the real crops keeps their PNG size and compressibility in the
    range of the fakes', so that file metadata does not give the label away (``unigendet leak-probe``). Returns
    ``img`` unchanged (and draws nothing) when ``sigma_range`` (default :data:`CAMERA_NOISE`) is ``(0, 0)``.
    """
    sigma_range = CAMERA_NOISE if sigma_range is None else sigma_range
    if sigma_range[1] <= 0:
        return img
    sigma = float(rng.uniform(*sigma_range))
    x = to_float(img)
    h, w = x.shape[:2]
    shared = rng.standard_normal((h, w, 1))
    own = np.zeros((h, w, 1)) if is_gray(img) else rng.standard_normal((h, w, 3))
    scale = sigma * np.sqrt(x @ _LUMA)[..., None]  # shot noise: its variance follows the local brightness
    return to_uint8(x + scale * (0.85 * shared + CAMERA_CHROMA * own))


def periodic_grid(hw: tuple[int, int], period: int, amp_range: tuple[float, float], rng: np.random.Generator,
                  diagonal: bool = False) -> np.ndarray:
    """A generator's periodic fingerprint, ``(H, W, 1)``, with amplitude ``a`` drawn from ``amp_range`` and a random
    phase: ``a * (cos(w (y + py)) + cos(w (x + px)))`` (spectral peaks on the axes, at 1/period of the sampling
    frequency), or with ``diagonal`` ``2 a * cos(w (y + py)) * cos(w (x + px))`` (peaks on the diagonals);
    ``w = 2 pi / period``. Zeros (nothing drawn) when the range is 0."""
    if amp_range[1] <= 0:
        return np.zeros((*hw, 1))
    amp = float(rng.uniform(*amp_range))
    py, px = rng.integers(0, period, size=2)
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]]
    cy, cx = np.cos(2 * np.pi / period * (yy + py)), np.cos(2 * np.pi / period * (xx + px))
    return amp * (2 * cy * cx if diagonal else cy + cx)[..., None]


def smooth_mask(hw: tuple[int, int], rng: np.random.Generator, radius: float) -> tuple[np.ndarray, tuple[int, int]]:
    """A soft Gaussian blob in [0, 1] at a random centre; returns the mask and the centre (y, x)."""
    h, w = hw
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    yy, xx = np.mgrid[0:h, 0:w]
    d2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (radius**2)
    return np.exp(-d2), (cy, cx)


########################################################################################################################
# (1) GAN-like transposed-convolution decoder


def _tconv_kernel(size: int, imbalance: float, rng: np.random.Generator) -> np.ndarray:
    """A 1-D transposed-convolution kernel for stride 2 whose even/odd taps sum to different values.

    A stride-2 transposed convolution sends even output positions the taps 0, 2, ... and odd positions 1, 3, ...;
    bilinear up-sampling has equal sums (no artifact). ``imbalance`` sets the relative gap between the two sums,
    which is exactly the amplitude of the period-2 pattern on a flat input.
    """
    base = np.array([0.5, 1.0, 0.5]) if size == 3 else np.array([0.25, 0.75, 0.75, 0.25])
    k = base * (1.0 + 0.06 * rng.standard_normal(size))
    even, odd = k[0::2].sum(), k[1::2].sum()
    sign = 1.0 if rng.random() < 0.5 else -1.0
    k[0::2] *= (1.0 + sign * imbalance / 2) / even
    k[1::2] *= (1.0 - sign * imbalance / 2) / odd
    return k


def _tconv2x(x: np.ndarray, kernels: list[np.ndarray]) -> np.ndarray:
    """Stride-2 transposed convolution of ``(h, w, C)`` with one separable kernel per channel -> ``(2h, 2w, C)``."""
    h, w, c = x.shape
    up = np.zeros((2 * h, 2 * w, c))
    up[::2, ::2] = x
    out = np.empty_like(up)
    for ch in range(c):
        k = kernels[ch]
        t = ndimage.convolve1d(up[..., ch], k, axis=0, mode="reflect", origin=-(len(k) % 2 == 0))
        out[..., ch] = ndimage.convolve1d(t, k, axis=1, mode="reflect", origin=-(len(k) % 2 == 0))
    return out


def gan_upsample(content: np.ndarray, rng: np.random.Generator) -> FakeResult:
    """Decode a low-resolution version of ``content`` with 1-3 unbalanced transposed-convolution stages.

    Args:
        content: uint8 ``(H, W, 3)`` real crop whose layout the "generator" reproduces; H, W multiples of 8.
        rng: the per-image random generator.

    Returns:
        The fake and ``info`` with ``n_stages``, ``factor``, ``kernel_size``, ``imbalance``, the artifact blob
        centre (y, x) and whether the channels got different kernels (colour fringes).
    """
    h, w = content.shape[:2]
    n_stages = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    factor = 2**n_stages
    gray = is_gray(content)
    low = to_float(resize(content, (h // factor, w // factor), Image.BOX))
    kernel_size = int(rng.choice([3, 4]))
    imbalance = float(rng.uniform(*GAN_IMBALANCE))
    per_channel = (not gray) and rng.random() < 0.4
    x = low
    for _ in range(n_stages):
        # Noise injection (StyleGAN-like): gets up-sampled by the remaining stages into a structured texture.
        x = x + float(rng.uniform(0.005, 0.02)) * rng.standard_normal(x.shape[:2])[..., None]
        shared = _tconv_kernel(kernel_size, imbalance, rng)
        kernels = [_tconv_kernel(kernel_size, imbalance, rng) if per_channel else shared for _ in range(3)]
        x = _tconv2x(x, kernels)
        x = np.where(x > 0, x, 0.1 * x)  # leaky ReLU
    # Clean bilinear decode of the same latent, blended outside a random blob: the artifacts are localised.
    clean = to_float(resize(to_uint8(low), (h, w), Image.BILINEAR))
    blob, centre = smooth_mask((h, w), rng, radius=float(rng.uniform(0.35, 0.7)) * max(h, w))
    alpha = np.clip(GAN_BLOB_FLOOR + (1 - GAN_BLOB_FLOOR) * blob / blob.max(), 0.0, 1.0)[..., None]
    out = alpha * x + (1.0 - alpha) * clean
    if gray:
        out = gray_rgb(out)
    info = {"n_stages": n_stages, "factor": factor, "kernel_size": kernel_size, "imbalance": round(imbalance, 3),
            "blob_centre": centre, "per_channel": per_channel}
    return FakeResult(to_uint8(out), info)


########################################################################################################################
# (2) Random-phase spectral synthesis with a 1/f spectrum


def _power_law_field(hw: tuple[int, int], beta: float, aniso: float, angle: float, rng: np.random.Generator):
    """A zero-mean, unit-variance periodic field with amplitude spectrum ``1 / f**beta`` and random phases."""
    h, w = hw
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * fx + s * fy, -s * fx + c * fy
    r = np.sqrt((u * aniso) ** 2 + (v / aniso) ** 2)
    amp = 1.0 / np.maximum(r, 1.0 / max(h, w)) ** beta
    amp[0, 0] = 0.0
    phase = np.exp(2j * np.pi * rng.random((h, w)))
    f = np.real(np.fft.ifft2(amp * phase))
    return (f - f.mean()) / (f.std() + 1e-12)


def spectral(hw: tuple[int, int], colour_ref: np.ndarray, rng: np.random.Generator) -> FakeResult:
    """Random-phase 1/f synthesis coloured like ``colour_ref``.

    Args:
        hw: output (height, width).
        colour_ref: uint8 real crop whose per-pixel colour mean and covariance the fake copies (a grayscale
            reference gives a grayscale fake).
        rng: the per-image random generator.

    Returns:
        The fake and ``info`` with the amplitude slope ``beta``, the anisotropy and the colour correlation used.
    """
    beta = float(rng.uniform(*SPECTRAL_BETA))
    aniso = float(np.exp(rng.uniform(-0.4, 0.4)))
    angle = float(rng.uniform(0, np.pi))
    lum = _power_law_field(hw, beta, aniso, angle, rng)
    chroma = [_power_law_field(hw, beta + float(rng.uniform(0.0, 0.5)), aniso, angle, rng) for _ in range(2)]
    rho = float(rng.uniform(0.5, 0.95))  # how much the colour follows the luminance pattern
    z = np.stack([lum, rho * lum + np.sqrt(1 - rho**2) * chroma[0], rho * lum + np.sqrt(1 - rho**2) * chroma[1]], -1)
    z = z.reshape(-1, 3)
    z = (z - z.mean(0)) / (z.std(0) + 1e-12)
    # Order fields by variance of the reference's principal axes: the luminance-like field drives the main axis.
    ref = to_float(colour_ref).reshape(-1, 3)
    mean, cov = ref.mean(0), np.cov(ref.T) + 1e-9 * np.eye(3)
    evals, evecs = np.linalg.eigh(cov)
    evals, evecs = evals[::-1], evecs[:, ::-1]
    contrast = float(rng.uniform(0.8, 1.2))
    out = mean + contrast * (z * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
    out = out.reshape(hw[0], hw[1], 3)
    out = out + periodic_grid(hw, 4, SPECTRAL_GRID, rng)
    if is_gray(colour_ref):
        out = gray_rgb(out)
    info = {"beta": round(beta, 3), "anisotropy": round(aniso, 3), "colour_rho": round(rho, 3)}
    return FakeResult(to_uint8(out), info)


########################################################################################################################
# (3) Diffusion-like iterative denoising from noise


def _perona_malik(x: np.ndarray, n_iter: int, kappa: float, step: float = 0.2) -> np.ndarray:
    """Edge-preserving anisotropic diffusion (Perona & Malik 1990) on every channel: flattens regions into plateaus."""
    x = x.copy()
    for _ in range(n_iter):
        dn = np.roll(x, 1, 0) - x
        ds = np.roll(x, -1, 0) - x
        de = np.roll(x, -1, 1) - x
        dw = np.roll(x, 1, 1) - x
        lum = lambda d: np.exp(-((d @ _LUMA.astype(d.dtype))[..., None] / np.float32(kappa)) ** 2)
        x = x + step * (lum(dn) * dn + lum(ds) * ds + lum(de) * de + lum(dw) * dw)
    return x


def diffusion_like(content: np.ndarray, rng: np.random.Generator) -> FakeResult:
    """Denoise from pure noise toward a coarse layout of ``content``.

    Each step predicts a clean image (Gaussian blur + unsharp mask of the current sample, pulled toward the layout),
    then re-noises it with a decreasing schedule; the result is smoothed edge-preservingly and keeps the last, uniform
    noise level.

    Args:
        content: uint8 ``(H, W, 3)`` real crop that provides the coarse layout (1/8 resolution) and colours.
        rng: the per-image random generator.

    Returns:
        The fake and ``info`` with the number of steps, the final grain level and the smoothing strength.
    """
    h, w = content.shape[:2]
    gray = is_gray(content)
    layout_factor = int(rng.choice([4, 8]))
    small = resize(content, (h // layout_factor, w // layout_factor), Image.BOX)
    layout = to_float(resize(small, (h, w), Image.BICUBIC)).astype(np.float32)  # float32: half the filter time
    n_steps = int(rng.integers(6, 12))
    sigma_max, grain = 0.6, float(rng.uniform(*DIFFUSION_GRAIN))
    pull = float(rng.uniform(0.25, 0.5))
    x = layout.mean((0, 1)) + sigma_max * rng.standard_normal((h, w, 3), dtype=np.float32)
    for t in range(n_steps):
        frac = (t + 1) / n_steps
        blur = ndimage.gaussian_filter(x, sigma=(1.5 * (1 - frac) + 0.6, 1.5 * (1 - frac) + 0.6, 0))
        x0 = blur + 0.5 * (blur - ndimage.gaussian_filter(blur, sigma=(2.0, 2.0, 0)))  # unsharp "denoiser"
        x0 = np.float32(1 - pull) * x0 + np.float32(pull) * layout
        level = sigma_max * (1 - frac) ** 2
        x = x0 + np.float32(level) * rng.standard_normal((h, w, 3), dtype=np.float32)
    n_pm = int(rng.integers(4, 12))
    kappa = float(rng.uniform(0.03, 0.08))
    x = _perona_malik(x, n_pm, kappa).astype(np.float64)
    noise = rng.standard_normal((h, w, 1 if gray else 3))
    x = x + grain * noise + periodic_grid((h, w), DIFFUSION_GRID_PERIOD, DIFFUSION_GRID, rng,
                                                  diagonal=True)
    if gray:
        x = gray_rgb(x)
    info = {"n_steps": n_steps, "grain": round(grain, 4), "smoothing_iters": n_pm, "layout_factor": layout_factor}
    return FakeResult(to_uint8(x), info)


########################################################################################################################
# (4) Splice / copy-move composites


def splice(host: np.ndarray, donor: np.ndarray, rng: np.random.Generator, copy_move: bool) -> FakeResult:
    """Paste a region of ``donor`` into ``host`` with a mismatch in colour, brightness, sharpness or noise.

    Args:
        host: uint8 ``(H, W, 3)`` real crop that receives the region.
        donor: uint8 real crop (any size >= 32 px per side) the region is cut from: another photo (splice) or
            another part of the same photo (copy-move).
        rng: the per-image random generator.
        copy_move: recorded in ``info`` (the donor comes from the same photograph).

    Returns:
        The fake and ``info`` with the boolean ``mask`` (H, W), the bounding box ``(y0, x0, y1, x1)``, the
        ``shape`` ("rectangular" or "elliptical"), the per-channel ``gain``, the donor ``treatment`` and
        ``copy_move``.
    """
    h, w = host.shape[:2]
    ph = int(rng.integers(int(SPLICE_SIDE[0] * h), int(SPLICE_SIDE[1] * h) + 1))
    pw = int(rng.integers(int(SPLICE_SIDE[0] * w), int(SPLICE_SIDE[1] * w) + 1))
    # The donor region is resampled by a random scale (resampling trace) to the patch size.
    scale = float(np.exp(rng.uniform(*SPLICE_SCALE)))
    sh, sw = min(donor.shape[0], max(8, int(ph * scale))), min(donor.shape[1], max(8, int(pw * scale)))
    dy, dx = int(rng.integers(0, donor.shape[0] - sh + 1)), int(rng.integers(0, donor.shape[1] - sw + 1))
    patch = to_float(resize(np.ascontiguousarray(donor[dy : dy + sh, dx : dx + sw]), (ph, pw), Image.BILINEAR))
    treatment = str(rng.choice(list(SPLICE_TREATMENTS)))
    if treatment == "blur":
        patch = ndimage.gaussian_filter(patch, sigma=(1.0, 1.0, 0))
    elif treatment == "noise":
        patch = patch + float(rng.uniform(*SPLICE_NOISE)) * rng.standard_normal(patch.shape[:2])[..., None]
    elif treatment == "sharpen":
        patch = patch + 1.0 * (patch - ndimage.gaussian_filter(patch, sigma=(1.0, 1.0, 0)))
    patch = patch + periodic_grid((ph, pw), SPLICE_GRID_PERIOD, SPLICE_GRID, rng)
    gain = 1.0 + float(rng.choice([-1, 1])) * rng.uniform(*SPLICE_GAIN) + rng.uniform(-0.08, 0.08, size=3)
    patch = patch * gain
    y0, x0 = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    shape = "rectangular" if rng.random() < 0.55 else "elliptical"
    mask = np.zeros((h, w), dtype=bool)
    if shape == "rectangular":
        mask[y0 : y0 + ph, x0 : x0 + pw] = True
    else:
        yy, xx = np.mgrid[0:ph, 0:pw]
        inside = ((yy + 0.5 - ph / 2) / (ph / 2)) ** 2 + ((xx + 0.5 - pw / 2) / (pw / 2)) ** 2 <= 1
        mask[y0 : y0 + ph, x0 : x0 + pw] = inside
    alpha = mask.astype(np.float64)
    if rng.random() < 0.3:  # a barely feathered edge instead of a hard one
        alpha = np.clip(ndimage.gaussian_filter(alpha, 0.7), 0, 1)
    canvas = to_float(host)
    full = canvas.copy()
    full[y0 : y0 + ph, x0 : x0 + pw] = patch
    out = alpha[..., None] * full + (1 - alpha[..., None]) * canvas
    if is_gray(host):
        out = gray_rgb(out)
    info = {"mask": mask, "bbox": (y0, x0, y0 + ph, x0 + pw), "shape": shape,
            "gain": [round(float(g), 3) for g in gain], "treatment": treatment, "copy_move": copy_move}
    return FakeResult(to_uint8(out), info)
