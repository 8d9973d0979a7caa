"""ProgressReport: a real Trainer on the small demo corpus, without W&B: one stderr line per validation that carries
exactly the head's numbers, per-family accuracy tied to the right records, and a curves PNG at the end."""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

from callbacks import ProgressReport
from tests.test_lit_module import corpus, make, trainer  # noqa: F401  (corpus is a fixture)
from unigendet.evaluation.plots import progress_curves_png
from unigendet.evaluation.scores import detection_summary


def test_one_line_per_validation_and_curves(corpus, tmp_path, capsys):  # noqa: F811
    lit, dm = make(corpus, ema_decay=None)
    cb = ProgressReport(curves=str(tmp_path / "out" / "curves.png"))
    tr = trainer(tmp_path, 4, limit_val_batches=3, val_check_interval=2, callbacks=[cb])
    tr.fit(lit, datamodule=dm)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[val] step")]
    assert [int(re.match(r"\[val\] step (\d+):", ln).group(1)) for ln in lines] == [2, 4]  # no sanity check line
    assert [r["step"] for r in cb.history] == [2, 4]

    # the last line's numbers are the head's on the samples of the last validation, per family from the records
    p, label = torch.cat(cb._p), torch.cat(cb._label)
    records = {r.id: r for r in dm.split_records("val")}
    want = detection_summary(p, label, [records[i].cate for i in cb._ids])
    last = cb.history[-1]
    assert last["acc"] == pytest.approx(want["acc"])
    assert last["per_family"] == pytest.approx({c: m["acc"] for c, m in want["per_category"].items()})
    assert f"acc {want['acc']:.3f}" in lines[-1]
    for cate, acc in last["per_family"].items():
        assert f"{cate} {acc:.2f}" in lines[-1]
    # the training losses between the validations, as the module returned them
    assert sorted(cb.train) == [1, 2, 3, 4] and all("train/loss_det" in v for v in cb.train.values())
    assert last["det"] == pytest.approx((cb.train[3]["train/loss_det"] + cb.train[4]["train/loss_det"]) / 2)
    assert re.search(r"\| det \d+\.\d{3} flow \d+\.\d{3}$", lines[-1]), lines[-1]

    png = tmp_path / "out" / "curves.png"
    assert png.is_file() and Image.open(png).size[0] > 600


def test_curves_refuse_without_validation(tmp_path):
    with pytest.raises(ValueError, match="no validation"):
        progress_curves_png([], {1: {"train/loss_det": 0.7}}, tmp_path / "c.png")
