"""Metadata leak probe: can real and fake be told apart WITHOUT looking at image content?

A detection corpus is only a test of forensic skill if the label is not written in the files' metadata. This probe
fits a classifier on metadata alone and reports its held-out accuracy; near 0.5 means no shortcut. Features
(:func:`metadata_features`), one vector per image:

* width, height, aspect ratio, pixel count;
* PNG file size, bytes per pixel and compression ratio (raw RGB bytes / file bytes);
* per-channel mean and standard deviation, and a grayscale flag.

The classifier is logistic regression on standardised features and their squares (so "a size band" or "a std range"
is catchable, not only a threshold), fitted by L-BFGS on the train split with a small L2 penalty, scored on a
held-out split with balanced classes (every real image weighs as much as all fakes together). Used by
``unigendet leak-probe`` on any FakeClue-format folder (one JSON line)::

    unigendet leak-probe demo-run/corpus/detection
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

FEATURES = ("width", "height", "aspect", "pixels", "file_bytes", "bytes_per_pixel", "compression_ratio",
            "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "gray")


def metadata_features(path: Path) -> list[float]:
    """The :data:`FEATURES` of one image file."""
    n_bytes = path.stat().st_size
    with Image.open(path) as im:
        x = np.asarray(im.convert("RGB"), dtype=np.float64)
    h, w = x.shape[:2]
    mean, std = x.reshape(-1, 3).mean(0), x.reshape(-1, 3).std(0)
    gray = float(np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 1], x[..., 2]))
    return [w, h, w / h, w * h, n_bytes, n_bytes / (w * h), 3 * w * h / n_bytes, *mean, *std, gray]


def load_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features, labels (1 = real) and ``cate`` of ``folder/{split}.json``."""
    records = json.loads((folder / f"{split}.json").read_text())
    x = np.array([metadata_features(folder / r["image"]) for r in records])
    return x, np.array([int(r["label"]) for r in records]), [str(r.get("cate", "")) for r in records]


def _expand(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    z = (x - mean) / std
    return torch.from_numpy(np.concatenate([z, z**2], axis=1))


def _weights(y: np.ndarray) -> torch.Tensor:
    """Balanced-class sample weights (each class sums to 1)."""
    w = np.where(y == 1, 1.0 / max(1, (y == 1).sum()), 1.0 / max(1, (y == 0).sum()))
    return torch.from_numpy(w / w.sum())


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Logistic regression on standardised features and their squares; returns P(real) on ``x_test``."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-9
    xt, xs = _expand(x_train, mean, std), _expand(x_test, mean, std)
    yt, wt = torch.from_numpy(y_train.astype(np.float64)), _weights(y_train)
    w = torch.zeros(xt.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt, weight=wt, reduction="sum")
        loss = nll + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return torch.sigmoid(xs @ w + b).numpy()


def probe(folder: Path, train: str = "train", test: str = "test") -> dict:
    """Fit on ``train``, score on ``test``: balanced accuracy overall and accuracy per ``cate``."""
    x_tr, y_tr, _ = load_split(folder, train)
    x_te, y_te, cates = load_split(folder, test)
    pred = (fit_predict(x_tr, y_tr, x_te) >= 0.5).astype(int)
    ok = pred == y_te
    balanced = 0.5 * (ok[y_te == 1].mean() + ok[y_te == 0].mean())
    per = {c: round(float(ok[[k == c for k in cates]].mean()), 3) for c in sorted(set(cates))}
    return {"heldout_balanced_acc": round(float(balanced), 4), "heldout_acc": round(float(ok.mean()), 4),
            "per_cate": per, "n_train": len(y_tr), "n_test": len(y_te), "features": list(FEATURES)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="unigendet leak-probe", description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="a FakeClue-format folder with train.json and test.json")
    ap.add_argument("--test-split", default="test", help="the held-out split to score (default: test)")
    args = ap.parse_args(argv)
    sys.stdout.write(json.dumps(probe(args.folder, test=args.test_split)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
