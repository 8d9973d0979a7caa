"""DetectionMetrics: its numbers against a hand-computed case, then a real Trainer and a real offline W&B run whose
history (read back from the run's transaction log) holds the per-category metrics, the ROC curve and the confusion
matrix of exactly the p(fake) values the module computed in validation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from callbacks import DetectionMetrics
from callbacks.detection_metrics import detection_sample_ids
from tests.test_explanations_callback import history, offline_wandb  # noqa: F401  (offline_wandb is a fixture)
from tests.test_lit_module import corpus, make, trainer  # noqa: F401  (corpus is a fixture)
from unigendet.evaluation.scores import detection_summary, loop_metrics


def test_summary_matches_a_hand_computed_case():
    # label 0 = fake, 1 = real; predicted fake when p(fake) >= 0.5
    p = torch.tensor([0.9, 0.4, 0.2, 0.8, 0.7, 0.6])
    label = torch.tensor([0, 0, 1, 1, 0, 0])
    cates = ["sd", "sd", "sd", "sd", "gan", "gan"]
    s = detection_summary(p, label, cates)
    # right: 0.9 (fake), 0.2 (real), 0.7, 0.6 (fake); wrong: 0.4 (a fake called real), 0.8 (a real called fake)
    assert s["acc"] == pytest.approx(4 / 6)
    # fake: TP 3, FP 1, FN 1 -> F1 3/4; real: TP 1, FP 1, FN 1 -> F1 1/2; macro 5/8
    assert s["f1"] == pytest.approx(0.625)
    # fake scores {0.9, 0.4, 0.7, 0.6} above real scores {0.2, 0.8} in 2 + 1 + 1 + 1 of 8 pairs
    assert s["auroc"] == pytest.approx(5 / 8)
    assert s["confusion"].tolist() == [[3, 1], [1, 1]]  # [true, predicted], fake first
    assert s["per_category"] == {"gan": {"n": 2, "acc": 1.0},  # all fake: accuracy only (= recall)
                                 "sd": {"n": 4, "acc": 0.5, "auroc": pytest.approx(3 / 4)}}
    # the module's overall numbers, same convention
    module = loop_metrics({"p_fake": [p[:2], p[2:]], "label": [label[:2], label[2:]], "ce": [torch.zeros(6)]})
    assert {k: s[k] for k in ("acc", "f1", "auroc")} == pytest.approx({k: module[k] for k in ("acc", "f1", "auroc")})


def test_sample_ids_follow_the_labelled_samples():
    # three packed samples of 5, 3 and 4 tokens; the middle one (a generation sample) has no label
    batch = SimpleNamespace(sample_lens=[5, 3, 4], sample_ids=["a", "g", "c"], det_indexes=torch.tensor([4, 8]))
    assert detection_sample_ids(batch) == ["a", "c"]


def test_logged_per_category_metrics_roc_and_confusion(corpus, offline_wandb, tmp_path):  # noqa: F811
    from lightning.pytorch.loggers import WandbLogger

    import wandb

    lit, dm = make(corpus, ema_decay=None)
    cb = DetectionMetrics()
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    tr = trainer(tmp_path, 2, limit_val_batches=3, val_check_interval=2, logger=logger, callbacks=[cb])
    tr.fit(lit, datamodule=dm)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    # what the callback collected is what the module computed, tied to the right records
    p, label = torch.cat(cb._p), torch.cat(cb._label)
    collected = lit.validation.collected
    assert torch.equal(p, torch.cat(collected["p_fake"])) and torch.equal(label, torch.cat(collected["label"]))
    records = {r.id: r for r in dm.split_records("val")}
    assert len(cb._ids) == len(p) == len(set(cb._ids)) > 0
    assert [records[i].label for i in cb._ids] == label.tolist()
    cates = [records[i].cate for i in cb._ids]
    expected = detection_summary(p, label, cates)["per_category"]
    assert len(expected) >= 2

    hist, _ = history(run_dir)
    (row,) = [r for r in hist if any(k.startswith("val/cate/") for k in r)]  # one validation, no sanity check
    assert row["trainer/global_step"] == tr.global_step
    logged = {k.removeprefix("val/cate/"): v for k, v in row.items() if k.startswith("val/cate/")}
    want = {f"{cate}/{name}": v for cate, m in expected.items() for name, v in m.items()}
    assert logged == pytest.approx(want, abs=1e-6)

    # the plots: custom charts whose data tables hold the ROC of the fake class and the confusion counts
    tables = {key: json.loads((run_dir / "files" / row[f"val/{key}_table"]["path"]).read_text())
              for key in ("roc", "confusion_matrix")}
    from torchmetrics.functional.classification import binary_roc

    fpr, tpr, _ = binary_roc(p, (label == 0).long())
    assert tables["roc"]["columns"] == ["class", "fpr", "tpr"]
    assert tables["roc"]["data"] == [["fake", round(float(x), 3), round(float(y), 3)]
                                     for x, y in zip(fpr, tpr, strict=True)]
    counts = detection_summary(p, label)["confusion"]
    assert tables["confusion_matrix"]["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert {(a, b): n for a, b, n in tables["confusion_matrix"]["data"]} == {
        (a, b): float(counts[i, j]) for i, a in enumerate(("fake", "real")) for j, b in enumerate(("fake", "real"))}
    charts = visualized(run_dir)
    assert charts["val/roc"]["panelDefId"] == "wandb/area-under-curve/v0"
    assert charts["val/confusion_matrix"]["panelDefId"] == "wandb/confusion_matrix/v1"
    for key, chart in charts.items():
        assert f'"tableKey", "value": "{key}_table"' in json.dumps(chart["userQuery"])


def visualized(run_dir: Path) -> dict[str, dict]:
    """The custom-chart panel configs the run declares (config ``_wandb.visualize``), by history key."""
    from tests.wandb_log import records

    charts = {}
    for rec in records(next(run_dir.glob("run-*.wandb"))):
        if rec.WhichOneof("record_type") == "config":
            for item in rec.config.update:
                if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                    charts[item.nested_key[2]] = json.loads(item.value_json)["panel_config"]
    return charts


def test_without_wandb_logger_is_a_noop_with_one_notice(corpus, tmp_path, caplog):  # noqa: F811
    lit, dm = make(corpus, ema_decay=None)
    cb = DetectionMetrics()
    with caplog.at_level(logging.INFO, logger="unigendet.callbacks"):
        trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2, callbacks=[cb]).fit(lit, datamodule=dm)
    notices = [r for r in caplog.records if r.name == "unigendet.callbacks"]
    assert len(notices) == 1 and "no-op" in notices[0].getMessage()
    assert lit.validation.collected["p_fake"] and cb._ids == [] and cb._p == []  # validation ran; nothing was collected
