"""bench/reproduce.py and bench/reproduce_report.py: the table aggregates the rows, the paired t-interval and the
verdict rules, resuming refuses rows of other settings, and a ``--smoke`` run (real ``unigendet fit`` / ``export``
subprocesses) writes rows, resumes without rerunning and leaves CNN accuracies that recompute from its predictions."""

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
import reproduce_report as report  # noqa: E402


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
    rows = [{"arm": "a", "seed": s, "head_acc": acc, "fit_s": w, "fid": None, "fid_note": "n/a (no weights)"}
            for s, acc, w in ((0, 0.5, 10.0), (1, 0.75, 20.0), (2, 0.6, 30.0))]
    md = report.table(rows + [{"arm": "b", "seed": 0, "head_acc": float("nan"), "fit_s": 1.0}])
    means = _cell_means(md)
    assert means["a"]["head Acc"] == pytest.approx(np.mean([0.5, 0.75, 0.6]), abs=5e-4)
    assert f"± {np.std([0.5, 0.75, 0.6], ddof=1):.3f}" in md
    assert means["a"]["train s"] == pytest.approx(20.0)
    assert "n/a (no weights)" in md and "head Acc" not in means["b"]  # NaN is left out, not averaged


def test_t_interval_is_the_student_interval_of_the_mean():
    mean, low, high = report.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729696 * 1.0 / math.sqrt(3)  # t(0.975, 2 df) * sd / sqrt(n)
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half), rel=1e-9)


@pytest.mark.parametrize(("higher", "low", "high", "expected"), [
    (True, 0.01, 0.05, "reproduced"), (True, -0.05, -0.01, "not reproduced"), (True, -0.01, 0.05, "inconclusive"),
    (False, -3.0, -1.0, "reproduced"), (False, 1.0, 3.0, "not reproduced"), (False, -1.0, 1.0, "inconclusive")])
def test_superiority_verdicts(higher, low, high, expected):
    claim = report.Claim("c", "a", "b", "m", higher)
    assert report.verdict(claim, low, high, b_mean=10.0).startswith(expected)


@pytest.mark.parametrize(("low", "high", "expected"), [
    (-0.005, 0.03, "reproduced"), (-0.03, -0.02, "not reproduced"), (-0.03, 0.01, "inconclusive")])
def test_non_inferiority_verdicts_use_the_margin(low, high, expected):
    acc = report.Claim("c", "a", "b", "head_acc", True, "non-inferior", 0.01)
    assert report.verdict(acc, low, high, b_mean=0.9).startswith(expected)
    # a relative margin on a lower-is-better distance: 5% of b's mean 20 = 1.0
    fd = report.Claim("c", "a", "b", "feat_fd", False, "non-inferior", 0.05, relative=True)
    assert report.verdict(fd, -100 * high, -100 * low, b_mean=20.0).startswith(expected)


def test_claims_pair_by_seed_and_read_as_verdicts():
    rows = []
    for seed, (smsa, no_smsa) in enumerate(((0.90, 0.80), (0.92, 0.81), (0.91, 0.83), (0.95, None))):
        rows.append({"arm": "gduf", "seed": seed, "head_acc": smsa})
        if no_smsa is not None:
            rows.append({"arm": "gduf_no_smsa", "seed": seed, "head_acc": no_smsa})
    claim = next(c for c in report.CLAIMS if c.metric == "head_acc" and c.b == "gduf_no_smsa")
    p = report.paired(rows, claim)
    assert p["seeds"] == [0, 1, 2]  # seed 3 has no partner
    assert p["mean"] == pytest.approx(np.mean([0.10, 0.11, 0.08]))
    assert p["verdict"] == "reproduced"
    md = report.claims_table(rows)
    assert "| gduf - gduf_no_smsa | head_acc (higher is better) | 0,1,2 | 0.097 |" in md and "reproduced" in md
    assert report.paired(rows[:2], claim)["verdict"] == "not enough seeds"


def test_resuming_refuses_rows_of_other_settings(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"arm": "gduf", "seed": 0, "settings": {"steps": 1000}}) + "\n")
    assert reproduce.read_rows(path, {"steps": 1000})[0]["arm"] == "gduf"
    with pytest.raises(SystemExit, match="other settings"):
        reproduce.read_rows(path, {"steps": 40})


def test_a_serial_arms_curve_continues_its_first_stage(tmp_path):
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("epoch,step,val/auroc,train/loss_mse\n0,9,,1.5\n0,19,0.6,\n0,499,,1.0\n")
    second.write_text("epoch,step,val/auroc,train/loss_mse\n0,9,,0.9\n0,249,0.7,\n")
    steps, values = report.arm_curve({"curves": [str(first), str(second)]}, "train/loss_mse")
    assert steps.tolist() == [9, 499, 509] and values.tolist() == [1.5, 1.0, 0.9]
    steps, values = report.arm_curve({"curves": [str(first), str(second)]}, "val/auroc")
    assert steps.tolist() == [19, 749] and values.tolist() == [0.6, 0.7]


@pytest.mark.slow  # fit + export subprocesses for three arms and a CNN, ~4 min on 2 cores: `make test-all`
def test_smoke_run_writes_rows_resumes_and_leaves_recomputable_cnn_predictions(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "bench/reproduce.py", "--smoke", "--arms", "gduf", "gduf_no_smsa", "gduf_diga", "cnn",
           "--work", str(work), "--out", str(out)]
    stale = work / "seed0" / "gduf" / "ckpt" / "last.ckpt"  # left by a run cut off part-way: must not be scored
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a checkpoint")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["seed"]) for r in rows] == [("gduf", 0), ("gduf_no_smsa", 0), ("gduf_diga", 0), ("cnn", 0)]
    gduf, no_smsa, diga, cnn = rows
    for row in (gduf, no_smsa, diga):
        for key in ("head_acc", "head_f1", "head_auroc", "rouge_l", "verdict_acc", "feat_fd", "demo_fd",
                    "gen_p_fake", "fit_s", "wall_s"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), key
        assert row["fid"] is not None or row["fid_note"].startswith("n/a")
        captions = (work / "corpus" / "t2i" / "test.jsonl").read_text().splitlines()
        assert row["n_generated"] == min(6, len(captions)) and row["n_images"] > 0  # --smoke: 6 at most
        assert all(os.path.exists(c) for c in row["curves"])
    # the runs' own saved configs: the arm's stage reached the trainer
    config = (work / "seed0" / "gduf_no_smsa" / "csv" / "version_0" / "config.yaml").read_text()
    assert "with_vae: false" in config and "joint: true" in config
    assert len(diga["curves"]) == 2 and "gduf_half" in diga["curves"][0]
    # the second stage started from the first one's export, a BAGEL-format folder
    assert (work / "seed0" / "gduf_half" / "export" / "llm_config.json").exists()
    assert f"init_from: {work / 'seed0' / 'gduf_half' / 'export'}" in \
        (work / "seed0" / "gduf_diga" / "csv" / "version_0" / "config.yaml").read_text()
    printed = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert printed == rows  # the printed JSON lines are the file's rows

    # the CNN: trained for the gduf fit's wall time, its accuracy recomputes from its predictions and the test split
    assert cnn["train_seconds"] == pytest.approx(gduf["fit_s"], abs=2.0)
    preds = [json.loads(ln) for ln in open(cnn["predictions"]).read().splitlines()]
    records = json.loads((work / "corpus" / "detection" / "test.json").read_text())
    assert len(preds) == cnn["n_images"] == len(records)
    truth = ["fake" if records[p["index"]]["label"] == 0 else "real" for p in preds]
    assert [p["label"] for p in preds] == truth
    assert cnn["head_acc"] == pytest.approx(np.mean([p["pred"] == t for p, t in zip(preds, truth, strict=True)]))

    # a second run resumes: nothing is rerun, the rows stay as they were
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [ln for ln in again.stdout.splitlines() if ln.startswith("{")]
    assert [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] == rows

    # the report: the table's means are the rows', one claim line per paired metric, the curves PNG
    rep = subprocess.run([sys.executable, "bench/reproduce_report.py", "--out", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr[-3000:]
    means = _cell_means((out / "table.md").read_text())
    assert means["gduf"]["head Acc"] == pytest.approx(gduf["head_acc"], abs=5e-4)
    assert means["cnn"]["AUROC"] == pytest.approx(cnn["head_auroc"], abs=5e-4)
    claims = (out / "claims.md").read_text()
    assert "gduf - gduf_no_smsa | head_acc" in claims and "not enough seeds" in claims
    assert (out / "curves.png").stat().st_size > 10_000
