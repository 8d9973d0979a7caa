"""DetectionMetrics: what the validation of the real/fake head looks like beyond three numbers, logged to W&B.

Features:

* **No second forward**: the module's ``validation_step`` returns p(fake) and the label of every detection sample of
  the batch (``{"p_fake": (N,), "label": (N,)}``, in the order of ``det_labels``, as ``LitUniGenDet`` does); this
  callback pairs them with the batch's sample ids, so every p(fake) is tied to its record.
* **Per category** (FakeClue ``cate``, the demo corpus' generator family): accuracy and sample count, and AUROC where
  the category holds both labels (an all-fake category has only accuracy, i.e. its recall). ``LitUniGenDet`` already
  logs the overall ``val/acc``, ``val/f1`` and ``val/auroc``; :func:`detection_summary` computes those too, with the
  same convention (fake = positive class, predicted fake when p(fake) >= 0.5), for reuse and checking.
* **Plots**: the ROC curve of the fake class (the chart ``wandb.plot.roc_curve`` makes, built from torchmetrics'
  ROC so that neither scikit-learn nor pandas is needed) and the confusion matrix (``wandb.plot.confusion_matrix``).
* **When**: at the end of every validation, not the sanity check, at ``trainer.global_step``; samples are gathered
  from all ranks and rank zero logs.
* **No W&B logger, no work**: one notice on logger ``unigendet.callbacks``, then nothing.

Keys (``key="val"``): ``val/cate/<cate>/acc``, ``val/cate/<cate>/auroc``, ``val/cate/<cate>/n``, ``val/roc``,
``val/confusion_matrix``.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from callbacks.wandb_only import find_wandb
from unigendet.evaluation.scores import detection_summary
from unigendet.training.data_contract import training_data

log = logging.getLogger("unigendet.callbacks")

CLASS_NAMES = ["fake", "real"]  # indexed by the dataset label: 0 = fake, 1 = real


########################################################################################################################
# the numbers
########################################################################################################################


def detection_sample_ids(batch) -> list:
    """The sample ids of a PackedBatch's detection samples, in the order of ``det_labels`` (one per labelled
    sample; a sample without a label, e.g. a generation sample, has none): each ``det_indexes`` position lies inside
    one sample of the packed sequence."""
    ends = torch.tensor(batch.sample_lens).cumsum(0)
    owner = torch.searchsorted(ends, batch.det_indexes, right=True)
    return [batch.sample_ids[k] for k in owner.tolist()]


########################################################################################################################
# the callback
########################################################################################################################
class DetectionMetrics(Callback):
    def __init__(self, key: str = "val", per_category: bool = True) -> None:
        self.key, self.per_category = key, per_category
        self._wandb: WandbLogger | None = None
        self._ids: list = []
        self._p: list[torch.Tensor] = []
        self._label: list[torch.Tensor] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._wandb = find_wandb(trainer, type(self).__name__)

    def _collecting(self, trainer: L.Trainer) -> bool:
        return self._wandb is not None and not trainer.sanity_checking

    # ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ids, self._p, self._label = [], [], []

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if not self._collecting(trainer):
            return
        if isinstance(batch, dict):  # as LitUniGenDet.validation_step picks it
            batch = batch.get("det") or batch.get("gen")
        if not isinstance(outputs, dict) or "p_fake" not in outputs or "label" not in outputs:
            raise RuntimeError(f"DetectionMetrics needs validation_step to return {{'p_fake', 'label'}} (as "
                               f"LitUniGenDet does); batch {batch_idx} returned {type(outputs).__name__}")
        p, label = outputs["p_fake"], outputs["label"]
        if not batch.det_labels.numel():
            if len(p):
                raise RuntimeError(f"validation batch {batch_idx} (loader {dataloader_idx}) has no detection "
                                   f"samples but the module returned {len(p)} p(fake) values")
            return
        if not torch.equal(label.cpu(), batch.det_labels.cpu()):
            raise RuntimeError(f"validation batch {batch_idx} (loader {dataloader_idx}): the returned labels are not "
                               "this batch's")
        ids = detection_sample_ids(batch)
        if len(ids) != len(p):
            raise RuntimeError(f"{len(ids)} detection sample ids for {len(p)} p(fake) values")
        self._ids += ids
        self._p.append(p.cpu())
        self._label.append(label.cpu())

    def gathered(self, trainer: L.Trainer) -> tuple[list, torch.Tensor, torch.Tensor]:
        """(sample ids, p(fake), labels) of this validation, from every rank."""
        p = torch.cat(self._p) if self._p else torch.zeros(0)
        label = torch.cat(self._label) if self._label else torch.zeros(0, dtype=torch.long)
        local = (self._ids, p.tolist(), label.tolist())
        if trainer.world_size > 1:
            import torch.distributed as dist

            parts = [None] * trainer.world_size
            dist.all_gather_object(parts, local)
        else:
            parts = [local]
        ids = [i for part in parts for i in part[0]]
        return (ids, torch.tensor([v for part in parts for v in part[1]], dtype=torch.float32),
                torch.tensor([v for part in parts for v in part[2]], dtype=torch.long))

    def categories(self, trainer: L.Trainer, ids: list) -> list[str | None] | None:
        """The ``cate`` of each sample id from the datamodule's val records; None when no record has one."""
        data = training_data(trainer)
        side = data.detection if data is not None else None
        if not self.per_category or side is None:
            return None
        cate = {r.id: getattr(r, "cate", None) for r in side.split_records("val")}
        if all(c is None for c in cate.values()):
            return None
        missing = [i for i in ids if i not in cate]
        if missing:
            raise KeyError(f"validation sample ids not among the datamodule's val records: {missing[:5]}")
        return [cate[i] for i in ids]

    def validation_summary(self, trainer: L.Trainer) -> tuple[torch.Tensor, torch.Tensor, dict] | None:
        """(p(fake), labels, :func:`detection_summary` with categories) of the validation that just ended, on rank
        zero; None elsewhere, when not collecting, or when it held no detection sample. Every rank must call it (the
        samples are gathered)."""
        if not self._collecting(trainer):
            return None
        ids, p, label = self.gathered(trainer)
        if not trainer.is_global_zero or not len(p):
            return None
        return p, label, detection_summary(p, label, self.categories(trainer, ids))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = self.validation_summary(trainer)
        if done is not None:
            self._wandb.log_metrics(self.wandb_entries(*done), step=trainer.global_step)

    def wandb_entries(self, p: torch.Tensor, label: torch.Tensor, summary: dict) -> dict:
        from torchmetrics.functional.classification import binary_roc

        import wandb

        entries: dict = {}
        for cate, m in summary.get("per_category", {}).items():
            entries.update({f"{self.key}/cate/{cate}/{name}": v for name, v in m.items()})
        fake = (label == 0).long()
        if fake.min() != fake.max():  # a ROC curve needs both classes
            fpr, tpr, _ = binary_roc(p, fake)
            rows = [["fake", round(float(x), 3), round(float(y), 3)] for x, y in zip(fpr, tpr, strict=True)]
            entries[f"{self.key}/roc"] = wandb.plot.plot_table(  # the chart of wandb.plot.roc_curve
                "wandb/area-under-curve/v0", wandb.Table(columns=["class", "fpr", "tpr"], data=rows),
                {"x": "fpr", "y": "tpr", "class": "class"},
                {"title": "ROC Curve (fake)", "x-axis-title": "False positive rate",
                 "y-axis-title": "True positive rate"})
        predicted = (p < 0.5).long()  # dataset label of the prediction: 0 = fake
        entries[f"{self.key}/confusion_matrix"] = wandb.plot.confusion_matrix(
            y_true=label.tolist(), preds=predicted.tolist(), class_names=CLASS_NAMES, title="Real/fake head")
        return entries
