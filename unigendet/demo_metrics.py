"""Numbers the demo reports beyond the head's (``callbacks.detection_metrics.detection_summary``): the explanation's
verdict and token-block artifacts.

* :func:`verdict` - the first "real" or "fake" (whole word, any case) of an explanation, or None;
* :func:`verdict_scores` - how often that verdict is right, and how often it agrees with the head;
* :func:`block_ratio` - mean absolute gradient across the borders of the model's token blocks over the mean inside
  them: about 1 for an image without a block pattern, well above 1 when every token's pixels are made on their own
  (the "8x8 block noise" of an untrained pixel-space generator).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

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
