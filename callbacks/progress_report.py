"""ProgressReport: one plain line per validation and a ``curves.png`` at the end, so a run shows that it learns.

Features:

* **One line per validation** on stderr (rank zero, not the sanity check)::

      [val] step 250: acc 0.712 AUROC 0.781 | real 0.80 diffusion_like 0.55 gan_upsample 0.96 ... | det 0.612 flow 0.745

  accuracy and AUROC of the real/fake head over the validation samples, its accuracy per FakeClue ``cate``, and the
  mean training detection-head and flow losses since the previous validation.
* **Curves**: at the end of fitting, :func:`unigendet.evaluation.plots.progress_curves_png` (per-family validation
  accuracy and
  the training losses against the step) to ``curves`` (default ``<trainer.default_root_dir>/curves.png``); with a
  W&B logger the same numbers go to W&B as ``val/cate/<cate>/acc`` and the picture as ``val/curves``.
* **No second forward**: p(fake) and sample ids are collected as :class:`callbacks.DetectionMetrics` does (it is
  its subclass), but with or without a W&B logger.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from callbacks.detection_metrics import DetectionMetrics

LOSSES = {"det": "train/loss_det", "flow": "train/loss_mse"}


def say(trainer: L.Trainer, line: str) -> None:
    """One line on stderr, through the progress bar when there is one (so it does not land inside the bar)."""
    bar = trainer.progress_bar_callback
    if isinstance(bar, TQDMProgressBar) and bar.is_enabled:
        bar.print(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


class ProgressReport(DetectionMetrics):
    def __init__(self, curves: str | None = None, key: str = "val") -> None:
        super().__init__(key=key, per_category=True)
        self.curves = curves
        self.history: list[dict] = []  # one row per validation
        self.train: dict[int, dict[str, float]] = {}  # step -> training values

    def _collecting(self, trainer: L.Trainer) -> bool:
        return not trainer.sanity_checking

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if isinstance(outputs, dict):
            values = {k: float(v) for k, v in outputs.items() if k in LOSSES.values()}
            if values:
                self.train[trainer.global_step] = values

    def _mean_since(self, key: str, step: int) -> float:
        values = [v[key] for s, v in self.train.items() if s > step and key in v and math.isfinite(v[key])]
        return sum(values) / len(values) if values else math.nan

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        done = self.validation_summary(trainer)
        if done is None:
            return
        summary = done[2]
        per = {c: m["acc"] for c, m in summary.get("per_category", {}).items()}
        previous = self.history[-1]["step"] if self.history else -1
        row = {"step": trainer.global_step, "acc": summary["acc"], "auroc": summary.get("auroc"), "per_family": per,
               **{name: self._mean_since(key, previous) for name, key in LOSSES.items()}}
        self.history.append(row)
        auroc = "n/a" if row["auroc"] is None else f"{row['auroc']:.3f}"
        fams = " ".join(f"{c} {a:.2f}" for c, a in per.items())
        losses = " ".join(f"{name} {row[name]:.3f}" for name in LOSSES if math.isfinite(row[name]))
        say(trainer, f"[val] step {row['step']}: acc {row['acc']:.3f} AUROC {auroc} | {fams} | {losses}".rstrip(" |"))
        if self._wandb is not None:
            self._wandb.log_metrics({f"{self.key}/cate/{c}/acc": a for c, a in per.items()},
                                    step=trainer.global_step)

    def curves_path(self, trainer: L.Trainer) -> Path:
        return Path(self.curves) if self.curves else Path(trainer.default_root_dir) / "curves.png"

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        from unigendet.evaluation.plots import progress_curves_png

        path = progress_curves_png(self.history, self.train, self.curves_path(trainer))
        say(trainer, f"[val] curves: {path}")
        if self._wandb is not None:
            self._wandb.log_image(key=f"{self.key}/curves", images=[str(path)], step=trainer.global_step)
