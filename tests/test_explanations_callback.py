"""ForensicExplanations with a real Trainer and a real offline W&B run: the logged table is read back from the run's
transaction log and checked against the panel's records and an independent forward of the EMA weights."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from callbacks import ForensicExplanations
from callbacks.explanations import COLUMNS, LABELS, choose_panel
from tests.test_lit_module import corpus, make, trainer  # noqa: F401  (corpus is a fixture)
from tests.wandb_log import records, set_nested


def history(run_dir: Path) -> tuple[list[dict], list]:
    """The run's history rows (nested media keys unfolded) and its artifact records."""
    rows, artifacts = [], []
    for rec in records(next(run_dir.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "artifact":
            artifacts.append(rec.artifact)
        if rec.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in rec.history.item:
                set_nested(row, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
            rows.append(row)
    return rows, artifacts


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_CONFIG_DIR"):
        d = tmp_path / var.lower()
        d.mkdir()
        monkeypatch.setenv(var, str(d))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg_cache"))
    return tmp_path


def test_table_of_panel_verdicts_and_explanations(corpus, offline_wandb, tmp_path):  # noqa: F811
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image
    from torchmetrics.text.rouge import ROUGEScore  # recomputed independently of unigendet.evaluation.text_metrics

    import wandb
    from unigendet.inference import Engine

    n, max_new = 4, 12
    lit, dm = make(corpus)
    cb = ForensicExplanations(n_images=n, max_new_tokens=max_new)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    tr = trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2, logger=logger, callbacks=[cb])
    tr.fit(lit, datamodule=dm)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    hist, artifacts = history(run_dir)
    tables = [r[cb.key] for r in hist if cb.key in r]
    assert len(tables) == 1  # one validation (at step 2); the sanity check is off
    meta = tables[0]
    assert meta["_type"] == "table-file" and meta["ncols"] == len(COLUMNS) and meta["nrows"] == n
    table = json.loads((run_dir / "files" / meta["path"]).read_text())
    assert table["columns"] == COLUMNS
    rows = [dict(zip(COLUMNS, row, strict=True)) for row in table["data"]]

    # the fixed panel: the first val records, balanced
    records = dm.split_records("val")
    panel = choose_panel(records, n)
    assert sorted(r.label for r in panel) == [0, 0, 1, 1]
    assert [row["id"] for row in rows] == [r.id for r in panel]
    assert [row["label"] for row in rows] == [LABELS[r.label] for r in panel]
    assert [row["category"] for row in rows] == [r.cate for r in panel]
    assert [row["reference"] for row in rows] == [r.answer for r in panel]

    # the images travel in the table's run_table artifact (staged under WANDB_DATA_DIR until `wandb sync`)
    (art,) = [a for a in artifacts if a.type == "run_table"]
    files = {m.path: Path(m.local_path) for m in art.manifest.contents}
    art_table = json.loads(files[f"{cb.key}.table.json"].read_text())
    assert art_table["columns"] == COLUMNS and len(art_table["data"]) == n
    for cells, rec in zip(art_table["data"], panel, strict=True):
        image = cells[COLUMNS.index("image")]
        assert image["_type"] == "image-file"
        logged = np.asarray(Image.open(files[image["path"]]).convert("RGB"))
        assert np.array_equal(logged, np.asarray(Image.open(Path(dm.val).parent / rec.image).convert("RGB")))

    # p(fake) and the greedy explanation, recomputed from the EMA weights
    root = Path(dm.val).parent
    lit.model.eval()
    with lit.ema.swap(lit.model), torch.no_grad():
        engine = Engine(lit.model, dm.tok)
        expected = [engine.detect([Image.open(root / r.image).convert("RGB")], prompt=r.prompt,
                                  max_new_tokens=max_new)[0] for r in panel]
    live = [engine.detect([Image.open(root / r.image).convert("RGB")], prompt=r.prompt, explain=False)[0]
            for r in panel]
    # (the EMA weights matter here: the live weights give other values)
    assert max(abs(a.p_fake - b.p_fake) for a, b in zip(expected, live, strict=True)) > 1e-4
    rouge = ROUGEScore(rouge_keys=("rougeL",), use_stemmer=True)
    for row, det in zip(rows, expected, strict=True):
        assert 0.0 <= row["p_fake"] <= 1.0
        assert row["p_fake"] == pytest.approx(det.p_fake, abs=1e-5)
        assert row["predicted"] == det.label
        assert row["explanation"] == det.explanation
        assert row["rouge_l"] == pytest.approx(float(rouge(row["explanation"], row["reference"])["rougeL_fmeasure"]),
                                               abs=1e-6)
    # a direct call leaves the live weights and train mode as they were
    lit.model.train()
    live = {k: v.clone() for k, v in lit.model.state_dict().items()}
    again = cb.detect_panel(tr, lit)
    assert lit.model.training
    assert all(torch.equal(v, lit.model.state_dict()[k]) for k, v in live.items())
    assert [r[COLUMNS.index("p_fake")] for r in again] == pytest.approx([r["p_fake"] for r in rows], abs=1e-6)


def test_without_wandb_logger_is_a_noop_with_one_notice(corpus, tmp_path, caplog, monkeypatch):  # noqa: F811
    lit, dm = make(corpus, ema_decay=None)
    cb = ForensicExplanations(every_n_steps=1, n_images=2)
    calls = []
    monkeypatch.setattr(cb, "detect_panel", lambda *a: calls.append(a))
    with caplog.at_level(logging.INFO, logger="unigendet.callbacks"):
        trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2, callbacks=[cb]).fit(lit, datamodule=dm)
    notices = [r for r in caplog.records if r.name == "unigendet.callbacks"]
    assert len(notices) == 1 and "no-op" in notices[0].getMessage()
    assert calls == [] and cb._panel is None
