"""Forensic measurements of one image, the facts the demo corpus's explanations and captions are written from.

:func:`measure` returns a :class:`Measurements` record: brightness, contrast, saturation, dominant hue and colour
cast; Immerkaer noise level globally and on a 3x3 grid of regions; smoothness and edge density; gradient kurtosis;
radially averaged spectral slope; windowed-periodogram peak ratios at the up-sampling frequencies 1/2, 1/4 and 1/8 of
the sampling frequency (globally, per region, and on a chroma channel); gradient anisotropy; wrap-around continuity
of the borders (periodic images); optional inside/outside statistics of a mask (splices).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

_LUMA = np.array([0.299, 0.587, 0.114])


REGION_NAMES = (
    ("upper-left", "upper-middle", "upper-right"),
    ("middle-left", "central", "middle-right"),
    ("lower-left", "lower-middle", "lower-right"),
)


PERIODS = (2, 4, 8)


PEAK_THRESHOLD = 8.0


@dataclass
class Measurements:
    height: int
    width: int
    brightness: float  # mean luminance in [0, 1]
    contrast: float  # std of luminance
    saturation: float  # mean HSV saturation
    gray: bool
    hue: str  # colour phrase, e.g. "warm brown"
    cast: str  # "warm", "cool", "green", "magenta" or "neutral"
    noise: float  # Immerkaer noise sigma in grey levels (0-255)
    noise_regions: np.ndarray  # (3, 3)
    noise_cv: float  # std / mean of noise_regions
    smooth_fraction: float  # pixels with almost no gradient once the grain is blurred away
    smooth_regions: np.ndarray  # (3, 3)
    edge_density: float  # pixels with a strong gradient
    grad_kurtosis: float  # kurtosis of horizontal luminance differences (3 = Gaussian)
    spectral_slope: float  # log-log slope of the radial power spectrum
    peaks: dict[int, float]  # period -> peak ratio (max over the axis and diagonal frequencies)
    peak_dirs: dict[int, str]  # period -> "axes" or "diagonals": where that maximum lies
    peak_regions: np.ndarray  # (3, 3) Nyquist (checkerboard) periodogram over mean power, per region
    chroma_peak: float  # max peak ratio on the R-B channel (colour fringes)
    anisotropy: float  # horizontal / vertical gradient energy
    wrap_ratio: float  # border-to-border difference / neighbour difference (about 1 for periodic images)
    mask_stats: dict[str, float] = field(default_factory=dict)


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def _noise_map(y: np.ndarray) -> np.ndarray:
    """Per-pixel Immerkaer (1996) noise response in grey levels: its mean is the noise sigma estimate."""
    return np.sqrt(np.pi / 2) * np.abs(ndimage.convolve(y, _IMMERKAER, mode="reflect")) / 6.0


def _grid(h: int, w: int) -> list[list[tuple[slice, slice]]]:
    ys, xs = np.linspace(0, h, 4).astype(int), np.linspace(0, w, 4).astype(int)
    return [[(slice(ys[i], ys[i + 1]), slice(xs[j], xs[j + 1])) for j in range(3)] for i in range(3)]


def _peak_ratios(x: np.ndarray, periods: tuple[int, ...] = PERIODS) -> tuple[dict[int, float], dict[int, str]]:
    """Periodogram peak over its radial neighbours at the up-sampling frequencies of each period, and where the
    strongest one lies for each period ("axes" or "diagonals").

    The high-passed, Hann-windowed periodogram is max-filtered over 3x3 bins (a windowed line spreads over one bin
    each side). For each target frequency (1/p on either axis and both diagonals) the ratio is its value over the
    median of 8 values on the same radial line, 3 to 0.35 * radius bins away on both sides (wrapping through
    Nyquist), so a smooth 1/f spectrum scores about 1 and a periodic pattern scores far above.
    """
    h, w = x.shape
    hp = x - ndimage.gaussian_filter(x, 2.0)
    win = np.outer(np.hanning(h), np.hanning(w))
    p = ndimage.maximum_filter(np.abs(np.fft.fft2(hp * win)) ** 2, size=3, mode="wrap")
    freq = np.repeat(1.0 / np.asarray(periods, dtype=np.float64), 4)  # 4 targets per period: both axes, diagonals
    dirs = np.tile(np.array([(1, 0), (0, 1), (1, 1), (1, -1)], dtype=np.float64), (len(periods), 1))
    by, bx = freq * dirs[:, 0] * h, freq * dirs[:, 1] * w  # targets in (fractional) bins
    r = np.hypot(by, bx)[:, None]
    offsets = np.stack([np.full_like(r[:, 0], 3.0), np.maximum(4.0, 0.15 * r[:, 0]), np.maximum(5.0, 0.25 * r[:, 0]),
                        np.maximum(6.0, 0.35 * r[:, 0])], 1)
    scales = np.concatenate([1 - offsets / r, 1 + offsets / r], 1)  # (targets, 8) along the radial line
    ref = np.median(p[np.rint(by[:, None] * scales).astype(int) % h, np.rint(bx[:, None] * scales).astype(int) % w], 1)
    peak = p[np.rint(by).astype(int) % h, np.rint(bx).astype(int) % w]
    ratio = (peak / (ref + 1e-12)).reshape(len(periods), 4)
    return {q: float(v) for q, v in zip(periods, ratio.max(1), strict=True)}, \
        {q: "diagonals" if v[2:].max() > v[:2].max() else "axes" for q, v in zip(periods, ratio, strict=True)}


def _checker_score(hp: np.ndarray, sy: np.ndarray, sx: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Periodogram of a high-passed region at the three Nyquist frequencies over its mean power (white noise ~ 1);
    with a boolean ``mask`` (the shape of ``hp``), over those pixels only (a region of any shape)."""
    signs = np.broadcast_arrays(sy, sx, sy * sx)
    if mask is not None:
        hp, signs = hp[mask], [s[mask] for s in signs]
    power = (hp**2).mean() + 1e-12
    return float(max(hp.size * ((hp * s).mean()) ** 2 for s in signs) / power)


def _spectral_slope(y: np.ndarray) -> float:
    h, w = y.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    p = np.abs(np.fft.fft2((y - y.mean()) * win)) ** 2
    r = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.fftfreq(w)[None, :] ** 2)
    edges = np.geomspace(0.04, 0.35, 12)
    idx = np.digitize(r.ravel(), edges)
    fs, ps = [], []
    for b in range(1, len(edges)):
        sel = idx == b
        if sel.any():
            fs.append(np.log(r.ravel()[sel].mean()))
            ps.append(np.log(p.ravel()[sel].mean() + 1e-20))
    return float(np.polyfit(fs, ps, 1)[0]) if len(fs) > 2 else 0.0


def _colour(img: np.ndarray) -> tuple[float, str, str]:
    """Mean saturation, a hue phrase ("warm brown", "cool blue", "grey", ...) and a colour-cast word."""
    rgb = img.reshape(-1, 3)
    mx, mn = rgb.max(1), rgb.min(1)
    sat = (mx - mn) / (mx + 1e-6)
    saturation = float(sat.mean())
    r, g, b = rgb.mean(0)
    warm, green = r - b, g - (r + b) / 2
    cast = "neutral"
    if abs(warm) > 0.04 or abs(green) > 0.03:
        if abs(warm) >= 1.3 * abs(green):
            cast = "warm" if warm > 0 else "cool"
        else:
            cast = "green" if green > 0 else "magenta"
    coloured = sat > 0.15
    if coloured.mean() < 0.08:
        return saturation, "grey", cast
    c = rgb[coloured]
    cmax, cmin = c.max(1), c.min(1)
    d = cmax - cmin + 1e-12
    r_, g_, b_ = c[:, 0], c[:, 1], c[:, 2]
    hsv_h = np.where(cmax == r_, ((g_ - b_) / d) % 6, np.where(cmax == g_, (b_ - r_) / d + 2, (r_ - g_) / d + 4)) / 6
    ang = np.angle(np.exp(2j * np.pi * hsv_h).mean()) / (2 * np.pi) % 1.0
    light = float(rgb.mean())
    deg = ang * 360
    if deg < 15 or deg >= 340:
        name = "dark red" if light < 0.35 else "red"
    elif deg < 45:
        name = "warm brown" if light < 0.5 else "orange"
    elif deg < 70:
        name = "olive" if light < 0.35 else "yellow"
    elif deg < 165:
        name = "green"
    elif deg < 200:
        name = "teal"
    elif deg < 255:
        name = "blue" if light >= 0.3 else "dark blue"
    elif deg < 300:
        name = "purple"
    else:
        name = "pink"
    if saturation < 0.2:
        name = "muted " + name
    return saturation, name, cast


def measure(img: np.ndarray, mask: np.ndarray | None = None) -> Measurements:
    """Measure one uint8 ``(H, W, 3)`` image (and, optionally, a pasted-region ``mask`` of shape ``(H, W)``)."""
    x = img.astype(np.float64) / 255.0
    h, w = x.shape[:2]
    y = x @ _LUMA
    y255 = y * 255.0
    grid = _grid(h, w)
    noise_map = _noise_map(y255)[1:-1, 1:-1]
    noise_map = np.pad(noise_map, 1, mode="edge")  # the 1-pixel border sees the reflected padding: reuse neighbours
    noise_regions = np.array([[float(noise_map[s].mean()) for s in row] for row in grid])
    ys = ndimage.gaussian_filter(y255, 1.0)
    gy, gx = np.gradient(ys)
    gmag = np.hypot(gx, gy)
    smooth = gmag < 1.5
    smooth_regions = np.array([[float(smooth[s].mean()) for s in row] for row in grid])
    hp = y - ndimage.gaussian_filter(y, 2.0)
    sy = (1.0 - 2.0 * (np.arange(h) % 2))[:, None]  # (-1)^y
    sx = (1.0 - 2.0 * (np.arange(w) % 2))[None, :]  # (-1)^x
    peak_regions = np.array([[_checker_score(hp[s], sy[s[0]], sx[:, s[1]]) for s in row] for row in grid])
    dx = np.diff(y255, axis=1).ravel()
    dy = np.diff(y255, axis=0).ravel()
    m2 = float((dx**2).mean()) + 1e-9
    saturation, hue, cast = _colour(x)
    gray = bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))
    wrap = (np.abs(y255[:, 0] - y255[:, -1]).mean() + np.abs(y255[0] - y255[-1]).mean()) / (
        np.abs(dx).mean() + np.abs(dy).mean() + 1e-9
    )
    peaks, peak_dirs = _peak_ratios(y)
    m = Measurements(
        height=h, width=w, brightness=float(y.mean()), contrast=float(y.std()), saturation=saturation, gray=gray,
        hue=hue, cast=cast, noise=float(noise_map.mean()), noise_regions=noise_regions,
        noise_cv=float(noise_regions.std() / (noise_regions.mean() + 1e-9)), smooth_fraction=float(smooth.mean()),
        smooth_regions=smooth_regions, edge_density=float((gmag > 20.0).mean()),
        grad_kurtosis=float((dx**4).mean() / m2**2), spectral_slope=_spectral_slope(y), peaks=peaks,
        peak_dirs=peak_dirs, peak_regions=peak_regions,
        chroma_peak=0.0 if gray else max(_peak_ratios(x[..., 0] - x[..., 2])[0].values()),
        anisotropy=float((gx**2).mean() / ((gy**2).mean() + 1e-9)), wrap_ratio=float(wrap),
    )
    if mask is not None and mask.any() and (~mask).any():
        ring = ndimage.binary_dilation(mask, iterations=6) & ~mask
        ring = ring if ring.any() else ~mask
        edge = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
        inner = ndimage.binary_erosion(mask, iterations=2)
        inner = inner if inner.any() else mask
        lap = np.abs(ndimage.laplace(y255))
        m.mask_stats = {
            "luma_in": float(y[mask].mean()), "luma_out": float(y[ring].mean()),
            "warm_shift": float((x[..., 0] - x[..., 2])[mask].mean() - (x[..., 0] - x[..., 2])[ring].mean()),
            "seam_ratio": float(np.abs(gmag[edge]).mean() / (gmag.mean() + 1e-9)),
            "detail_in": float(lap[inner].mean()),
            "detail_out": float(lap[~ndimage.binary_dilation(mask, iterations=2)].mean()),
            "grid_in": _checker_score(hp, sy, sx, mask), "grid_out": _checker_score(hp, sy, sx, ~mask),
        }
    return m


def region_name(ij: tuple[int, int]) -> str:
    return REGION_NAMES[ij[0]][ij[1]]
