"""unigendet/demo_metrics.py: verdict parsing and scores, the token-block ratio."""

from __future__ import annotations

import numpy as np
import pytest

from unigendet.demo_metrics import block_ratio, verdict, verdict_scores


def test_verdict_is_the_first_real_or_fake_word():
    assert verdict("This is a fake image. It is not real.") == "fake"
    assert verdict("REAL photo, no fake traces") == "real"
    assert verdict("This is a realistic, unfaked image.") is None  # whole words only
    assert verdict(None) is None and verdict("") is None


def test_verdict_scores_count_missing_verdicts_as_wrong():
    out = verdict_scores(["This is a fake image.", "This is a real image.", "no idea", "This is a fake image."],
                         labels=["fake", "fake", "real", "real"], head=["fake", "real", "real", "real"])
    assert out == {"verdict_acc": 0.25, "verdict_agreement": 0.5, "no_verdict": 1}
    with pytest.raises(ValueError, match="same length"):
        verdict_scores(["fake"], ["fake", "real"], ["fake"])


def test_block_ratio_separates_token_blocks_from_smooth_images():
    rng = np.random.default_rng(0)
    blocks = np.kron(rng.random((4, 4, 3)), np.ones((8, 8, 1)))  # every 8x8 block flat, jumps at the borders
    assert block_ratio(blocks * 255, 8) > 100
    yy, xx = np.mgrid[0:32, 0:32]
    ramp = np.stack([yy + xx, 2 * yy, 3 * xx], -1).astype(float)  # the same gradient everywhere
    assert block_ratio(ramp, 8) == pytest.approx(1.0)
    noise = rng.random((64, 64, 3))
    assert 0.9 < block_ratio(noise, 8) < 1.1
    # independent noise per block with a per-block offset: the pattern an untrained pixel-space generator makes
    patchy = noise + np.kron(rng.random((8, 8, 3)), np.ones((8, 8, 1)))
    assert block_ratio(patchy, 8) > 1.3
    with pytest.raises(ValueError, match="at least 16"):
        block_ratio(np.zeros((8, 32)), 8)
