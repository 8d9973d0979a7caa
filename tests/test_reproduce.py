"""bench/reproduce.py: the table aggregates its rows, the pixel Fréchet distance matches the full-covariance formula,
and a ``--smoke`` run (real ``unigendet fit`` / ``test`` subprocesses) writes rows whose CNN accuracy recomputes from
the saved per-image predictions."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import reproduce  # noqa: E402


def _cell_means(table_md: str) -> dict[str, dict[str, float]]:
    """{arm: {column title: mean}} from the Markdown table (cells "mean ± std")."""
    lines = [ln for ln in table_md.splitlines() if ln.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = {h: float(c.split(" ± ")[0]) for h, c in zip(header, cells, strict=True) if " ± " in c}
    return out


def test_table_means_and_spread_are_the_rows():
    rows = [{"arm": "a", "seed": s, "head_acc": acc, "wall_s": w, "fid": None, "fid_note": "n/a (no Inception weights)"}
            for s, acc, w in ((0, 0.5, 10.0), (1, 0.75, 20.0), (2, 0.6, 30.0))]
    md = reproduce.table(rows + [{"arm": "b", "seed": 0, "head_acc": float("nan"), "wall_s": 1.0}])
    means = _cell_means(md)
    assert means["a"]["head Acc"] == pytest.approx(np.mean([0.5, 0.75, 0.6]), abs=5e-4)
    assert f"± {np.std([0.5, 0.75, 0.6], ddof=1):.3f}" in md
    assert means["a"]["wall s"] == pytest.approx(20.0)
    assert "n/a (no Inception weights)" in md and "head Acc" not in means["b"]  # NaN is left out, not averaged


def test_pixel_frechet_matches_the_full_covariance_formula():
    rng = np.random.default_rng(0)
    for n, d in ((50, 6), (7, 12)):  # full-rank covariances, and fewer samples than dimensions
        a, b = rng.normal(size=(n, d)), rng.normal(1.0, 2.0, size=(n + 3, d))
        sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        eig = np.linalg.eigvals(sa @ sb).real.clip(min=0)
        expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(eig).sum()
        assert reproduce.frechet(a, b) == pytest.approx(expected, rel=1e-6)
    assert reproduce.frechet(a, a) == pytest.approx(0.0, abs=1e-8)


@pytest.mark.slow  # two fit + test subprocesses and a CNN, ~2-3 min on 2 cores: `make test-all`
def test_smoke_run_writes_rows_a_table_and_recomputable_cnn_predictions(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/reproduce.py", "--smoke", "--arms", "gduf", "cnn",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["seed"], r["steps"]) for r in rows] == [("gduf", 0, 2), ("cnn", 0, 2)]
    gduf, cnn = rows
    for key in ("head_acc", "head_f1", "head_auroc", "text_acc", "text_f1", "rouge_l", "css", "pixel_fd32",
                "gen_p_fake", "wall_s"):
        assert isinstance(gduf[key], float) and math.isfinite(gduf[key]), key
    assert gduf["fid"] is not None or gduf["fid_note"] == "n/a (no Inception weights)"
    assert gduf["n_images"] == 6 and gduf["n_generated"] == 3
    for key in ("head_acc", "head_f1", "head_auroc", "wall_s"):
        assert isinstance(cnn[key], float), key
    # the printed JSON lines are the file's rows
    printed = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert printed == rows

    # the table's means are the rows' means (one seed: the row itself, rounded as printed)
    means = _cell_means((out / "table.md").read_text())
    assert means["gduf"]["head Acc"] == pytest.approx(gduf["head_acc"], abs=5e-4)
    assert means["gduf"]["ROUGE-L"] == pytest.approx(gduf["rouge_l"], abs=5e-4)
    assert means["gduf"]["pixel FD (32 px)"] == pytest.approx(gduf["pixel_fd32"], abs=0.05)
    assert means["cnn"]["head Acc"] == pytest.approx(cnn["head_acc"], abs=5e-4)
    assert means["cnn"]["AUROC"] == pytest.approx(cnn["head_auroc"], abs=5e-4)

    # the CNN's accuracy, recomputed from its saved predictions against the test split's own labels
    preds = [json.loads(ln) for ln in open(cnn["predictions"]).read().splitlines()]
    records = json.loads((tmp_path / "work" / "corpus" / "detection" / "test.json").read_text())
    assert len(preds) == cnn["n_images"] == 6
    truth = ["fake" if records[p["index"]]["label"] == 0 else "real" for p in preds]
    assert [p["label"] for p in preds] == truth
    assert [p["pred"] for p in preds] == ["fake" if p["p_fake"] >= 0.5 else "real" for p in preds]
    assert cnn["head_acc"] == pytest.approx(np.mean([p["pred"] == t for p, t in zip(preds, truth, strict=True)]))
