"""unigendet/demo/metrics.py: verdict parsing and scores, the token-block ratio."""

from __future__ import annotations

import numpy as np
import pytest

from unigendet.demo.metrics import block_ratio, verdict, verdict_scores


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


def _images(arrays):
    from PIL import Image

    return [Image.fromarray(np.clip(a * 255, 0, 255).astype(np.uint8)) for a in arrays]


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift():
    from unigendet.demo.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.standard_normal((500, 6))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    # two Gaussians with identity covariance: the distance is the squared mean gap
    assert frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-6)
    # a covariance change alone: N(0, I) against N(0, 4 I) in 6 dims is 6 * (1 + 4 - 2 * 2) = 6
    assert frechet_distance(rng.standard_normal((20000, 6)), 2 * rng.standard_normal((20000, 6))) == \
        pytest.approx(6.0, rel=0.05)
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(a, a[:, :3])


def test_fd_features_tell_block_noise_from_smooth_images():
    from unigendet.demo.metrics import fd_features, frechet_distance

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:48, 0:40] / 48.0

    def smooth():  # random colour ramps, any size: the features crop to a square and resize to 32 px
        c0, c1 = rng.random(3), rng.random(3)
        return c0 + (c1 - c0) * (0.5 * yy + 0.5 * xx)[..., None]

    real = fd_features(_images([smooth() for _ in range(200)]))
    assert real.shape == (200, 3 * 16 + 8)
    other_smooth = fd_features(_images([smooth() for _ in range(64)]))
    blocks = fd_features(_images([np.kron(rng.random((4, 4, 3)), np.ones((8, 8, 1))) for _ in range(64)]))
    assert frechet_distance(blocks, real) > 5 * frechet_distance(other_smooth, real)
