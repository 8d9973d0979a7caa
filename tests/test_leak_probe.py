"""The metadata leak probe (unigendet/demo/leak_probe.py): it must catch a planted leak and stay near chance without
one.

Each test writes a small FakeClue-format folder of smooth random images. "Fakes" differ from "reals" only in the way
the test plants, so the probe's held-out accuracy is known in advance: near 1 with a metadata leak, near 0.5 without.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from unigendet.demo.leak_probe import FEATURES, metadata_features, probe


def _image(rng: np.random.Generator, noise: float) -> np.ndarray:
    h, w = (int(s) for s in rng.choice([32, 40, 48], size=2))
    base = ndimage.gaussian_filter(rng.random((h, w, 3)), sigma=(3, 3, 0))
    base = (base - base.min()) / (np.ptp(base) + 1e-9)
    x = base + noise * rng.standard_normal((h, w, 3))
    return np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)


def _corpus(root: Path, fake_noise: float, n: dict[str, int], seed: int = 0) -> Path:
    """Half real, half fake per split; fakes get Gaussian noise of ``fake_noise`` (0: identical distributions)."""
    rng = np.random.default_rng(seed)
    for split, count in n.items():
        records = []
        for i in range(count):
            label = i % 2  # 1 = real
            rel = f"images/{split}/{i:04d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_image(rng, 0.0 if label else fake_noise)).save(root / rel)
            records.append({"image": rel, "label": label, "cate": "real" if label else "noisy"})
        (root / f"{split}.json").write_text(json.dumps(records))
    return root


def test_features_of_one_file(tmp_path):
    img = np.zeros((8, 16, 3), np.uint8)
    img[..., 0] = 200
    Image.fromarray(img).save(tmp_path / "a.png")
    f = dict(zip(FEATURES, metadata_features(tmp_path / "a.png"), strict=True))
    assert (f["width"], f["height"], f["aspect"], f["pixels"]) == (16, 8, 2.0, 128)
    assert f["file_bytes"] == (tmp_path / "a.png").stat().st_size
    assert f["compression_ratio"] == pytest.approx(3 * 128 / f["file_bytes"])
    assert (f["mean_r"], f["mean_g"], f["std_r"], f["gray"]) == (200.0, 0.0, 0.0, 0.0)


def test_probe_catches_a_planted_noise_leak(tmp_path):
    """Noisy fakes compress worse: file size and compression ratio give them away."""
    out = probe(_corpus(tmp_path, fake_noise=0.08, n={"train": 200, "test": 100}))
    assert out["heldout_balanced_acc"] >= 0.9, out
    assert out["per_cate"]["noisy"] >= 0.85 and out["per_cate"]["real"] >= 0.85, out


def test_probe_stays_near_chance_without_a_leak(tmp_path):
    out = probe(_corpus(tmp_path, fake_noise=0.0, n={"train": 200, "test": 100}))
    assert 0.35 <= out["heldout_balanced_acc"] <= 0.65, out


def test_the_demo_corpus_does_not_leak_its_labels(tmp_path):
    """The corpus `make demo` builds (full size, seed 0): metadata alone stays at or below 0.60 held-out accuracy."""
    from unigendet.demo.corpus import build_demo_corpus

    build_demo_corpus(tmp_path / "corpus", seed=0)
    out = probe(tmp_path / "corpus" / "detection")
    assert out["n_test"] >= 800 and out["heldout_balanced_acc"] <= 0.60, out
