"""Detection scores, one definition for every place that reports them: the validation and test loops, the
DetectionMetrics callback, the evaluation report and the demo.

Convention: dataset labels are 0 = fake, 1 = real; fake is the positive class and is predicted when p(fake) >= 0.5;
AUROC is nan when only one label is present.
"""

from __future__ import annotations

from typing import Any

import torch

LABELS = ("fake", "real")  # indexed by the dataset label


def head_scores(p_fake: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 and AUROC of per-sample p(fake) (N,) against dataset labels (N,) (0 = fake, 1 = real):
    fake is the positive class, predicted when p(fake) >= 0.5; AUROC is nan when only one label is present. The one
    definition behind ``val/…``, ``test/…``, the DetectionMetrics callback and the evaluation report."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_f1_score

    p = p_fake.float()
    fake = (label == 0).long()
    pred = (p >= 0.5).long()
    return {"acc": float((pred == fake).float().mean()),
            "f1": float(multiclass_f1_score(pred, fake, num_classes=2, average="macro")),
            "auroc": float(binary_auroc(p, fake)) if fake.min() != fake.max() else float("nan")}


def label_scores(truth: list[str], pred: list[str | None]) -> dict[str, float]:
    """Accuracy and macro-F1 over {fake, real}; a None prediction is wrong (it becomes the other label)."""
    from torchmetrics.functional.classification import multiclass_f1_score

    y = torch.tensor([LABELS.index(t) for t in truth])
    p = torch.tensor([LABELS.index(q) if q is not None else 1 - LABELS.index(t)
                      for t, q in zip(truth, pred, strict=True)])
    return {"acc": float((p == y).float().mean()),
            "f1": float(multiclass_f1_score(p, y, num_classes=2, average="macro"))}


def summarize_detection(rows: list[dict]) -> dict[str, Any]:
    """Metrics of detection rows, overall and per category."""
    if not rows:
        return {"n": 0}
    truth = [r["label"] for r in rows]
    out: dict[str, Any] = {"n": len(rows), "n_fake": truth.count("fake"), "n_real": truth.count("real")}
    out["head"] = head_scores(torch.tensor([r["p_fake"] for r in rows]), torch.tensor([LABELS.index(t) for t in truth]))
    if "text" in rows[0]:
        texts = [r["text"] for r in rows]
        out["text"] = {**label_scores(truth, texts), "unparsed": sum(t is None for t in texts),
                       "agrees_with_head": sum(r["text"] == r["head"] for r in rows) / len(rows)}
        out["rouge_l"] = sum(r["rouge_l"] for r in rows) / len(rows)
        out["css"] = sum(r["css"] for r in rows) / len(rows)
    cates = sorted({r["cate"] for r in rows if r["cate"] is not None})
    if cates:
        out["per_category"] = {}
        for c in cates:
            sub = [r for r in rows if r["cate"] == c]
            truth = [r["label"] for r in sub]
            entry = {"n": len(sub), "head_acc": label_scores(truth, [r["head"] for r in sub])["acc"]}
            if "text" in sub[0]:
                entry["text_acc"] = label_scores(truth, [r["text"] for r in sub])["acc"]
                entry["rouge_l"] = sum(r["rouge_l"] for r in sub) / len(sub)
                entry["css"] = sum(r["css"] for r in sub) / len(sub)
            out["per_category"][c] = entry
    return out


def detection_summary(p_fake: torch.Tensor, label: torch.Tensor, cates: list[str | None] | None = None) -> dict:
    """Metrics of per-sample p(fake) (N,) against dataset labels (N,) (0 = fake, 1 = real).

    Returns ``acc``, ``f1`` (macro over the two classes), ``auroc`` (nan when only one label is present),
    ``confusion`` (2, 2) counts indexed [true, predicted] by dataset label, and, when ``cates`` is given,
    ``per_category``: ``{cate: {"n", "acc"[, "auroc"]}}`` for every category that is not None.
    """
    from torchmetrics.functional.classification import binary_auroc

    p = p_fake.float()
    out: dict = head_scores(p, label)
    fake, pred = (label == 0).long(), (p >= 0.5).long()
    predicted_label = 1 - pred  # back to the dataset's labels
    out["confusion"] = torch.bincount(label.long() * 2 + predicted_label, minlength=4).reshape(2, 2)
    if cates is not None:
        if len(cates) != len(p):
            raise ValueError(f"{len(cates)} categories for {len(p)} samples")
        per: dict[str, dict] = {}
        for cate in sorted({c for c in cates if c is not None}):
            m = torch.tensor([c == cate for c in cates])
            f = fake[m]
            per[cate] = {"n": int(m.sum()), "acc": float((pred[m] == f).float().mean())}
            if f.min() != f.max():
                per[cate]["auroc"] = float(binary_auroc(p[m], f))
        out["per_category"] = per
    return out


def loop_metrics(val: dict[str, list]) -> dict[str, float]:
    """Accuracy, macro-F1 and AUROC of the head (fake = positive), CE and flow loss, from collected tensors."""
    out: dict[str, float] = {}
    if val.get("p_fake"):
        out.update(head_scores(torch.cat(val["p_fake"]), torch.cat(val["label"])))
        out["loss_ce"] = float(torch.cat(val["ce"]).mean())
    if val.get("mse"):
        out["loss_mse"] = float(torch.cat(val["mse"]).mean())
    return out
