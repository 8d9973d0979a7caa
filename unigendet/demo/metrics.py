"""Numbers the demo reports beyond the head's (``unigendet.evaluation.scores.detection_summary``): the explanation's
verdict and token-block artifacts.

* :func:`verdict` - the first "real" or "fake" (whole word, any case) of an explanation, or None;
* :func:`verdict_scores` - how often that verdict is right, and how often it agrees with the head;
* :func:`block_ratio` - mean absolute gradient across the borders of the model's token blocks over the mean inside
  them: about 1 for an image without a block pattern, well above 1 when every token's pixels are made on their own
  (the "8x8 block noise" of an untrained pixel-space generator);
* :func:`fd_features` / :func:`frechet_distance` - the demo's 32-px Frechet distance between image sets. No Inception
  network can be downloaded here, so the features are fixed and weight-free: each image centre-cropped and resized to
  32 px, then its 4x4 mean colours (layout and colour) and its radially averaged log power spectrum (texture, blocks).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import linalg

_VERDICT = re.compile(r"\b(real|fake)\b", re.IGNORECASE)


def verdict(text: str | None) -> str | None:
    """``"real"``, ``"fake"`` or None: the first of the two words in ``text``."""
    m = _VERDICT.search(text or "")
    return m.group(1).lower() if m else None


def verdict_scores(explanations: Sequence[str | None], labels: Sequence[str],
                   head: Sequence[str]) -> dict[str, float | int]:
    """``verdict_acc`` (verdict == label), ``verdict_agreement`` (verdict == head) and ``no_verdict`` (count).

    An explanation without a verdict counts as wrong and as disagreeing.
    """
    if not (len(explanations) == len(labels) == len(head)):
        raise ValueError("explanations, labels and head predictions must have the same length")
    verdicts = [verdict(e) for e in explanations]
    n = max(1, len(verdicts))
    return {"verdict_acc": round(sum(v == y for v, y in zip(verdicts, labels, strict=True)) / n, 4),
            "verdict_agreement": round(sum(v == h for v, h in zip(verdicts, head, strict=True)) / n, 4),
            "no_verdict": sum(v is None for v in verdicts)}


def block_ratio(image: np.ndarray, block: int) -> float:
    """Mean |horizontal and vertical neighbour difference| across ``block``-pixel borders / the mean inside blocks.

    Args:
        image: ``(H, W)`` or ``(H, W, C)`` array (any numeric type); H and W at least ``2 * block``.
        block: pixels per token side (``UniGenDetConfig.vae_pixels_per_token``).
    """
    x = np.asarray(image, dtype=np.float64)
    if x.ndim == 2:
        x = x[..., None]
    if block < 2 or x.shape[0] < 2 * block or x.shape[1] < 2 * block:
        raise ValueError(f"need block >= 2 and an image of at least {2 * block} px per side, got {x.shape[:2]}")
    dx = np.abs(np.diff(x, axis=1)).mean(-1)  # (H, W-1): difference between columns j and j+1
    dy = np.abs(np.diff(x, axis=0)).mean(-1)  # (H-1, W)
    border_x = (np.arange(dx.shape[1]) + 1) % block == 0
    border_y = (np.arange(dy.shape[0]) + 1) % block == 0
    across = np.concatenate([dx[:, border_x].ravel(), dy[border_y, :].ravel()])
    inside = np.concatenate([dx[:, ~border_x].ravel(), dy[~border_y, :].ravel()])
    return float(across.mean() / max(inside.mean(), 1e-6))


FD_PX = 32
"""Side (pixels) the images are brought to before :func:`fd_features`."""


def fd_features(images: Sequence[Image.Image], px: int = FD_PX, cells: int = 4, bins: int = 8) -> np.ndarray:
    """``(N, 3 * cells**2 + bins)`` features: mean RGB of a ``cells x cells`` grid and the log power of the
    luminance spectrum in ``bins`` radial rings (DC excluded), after a centre crop to a square and a resize to ``px``.
    """
    if px % cells:
        raise ValueError(f"px ({px}) must be a multiple of cells ({cells})")
    fy, fx = np.meshgrid(np.fft.fftfreq(px), np.fft.fftfreq(px), indexing="ij")
    ring = np.minimum((np.hypot(fy, fx) / 0.5 * bins).astype(int), bins - 1)  # 0.5 = the Nyquist frequency
    ring[0, 0] = -1
    from unigendet.evaluation.fidelity import fidelity_images

    squares = fidelity_images(list(images), px, resample=Image.BILINEAR).permute(0, 2, 3, 1).numpy()  # (N, px, px, 3)
    feats = []
    for x in np.ascontiguousarray(squares, dtype=np.float64) / 255.0:
        grid = x.reshape(cells, px // cells, cells, px // cells, 3).mean((1, 3)).ravel()
        y = x @ np.array([0.299, 0.587, 0.114])
        power = np.abs(np.fft.fft2(y - y.mean())) ** 2 / px**2
        spectrum = np.array([np.log10(power[ring == b].mean() + 1e-8) for b in range(bins)])
        feats.append(np.concatenate([grid, spectrum]))
    return np.stack(feats)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of ``a`` and of ``b`` (``(N, D)`` each, N >= 2):
    ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))``, the formula of FID."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N >= 2, D) feature arrays of the same D, got {a.shape} and {b.shape}")
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    if not np.isfinite(root).all():  # singular product: nudge both covariances, as FID implementations do
        eps = 1e-6 * np.eye(len(ca))
        root = linalg.sqrtm((ca + eps) @ (cb + eps))
    return float(max(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * np.trace(root.real), 0.0))
