"""StepLog: every training step's logged ``train/*`` values as one JSON line, for audits of exact resume.

Rank 0 appends ``{"step": global_step, "train/loss_det": ..., ...}`` after every training batch to ``path``
(default: ``steps.jsonl`` in the run's folder, next to its checkpoints and ``config.yaml`` when the run has a
logger, else in ``default_root_dir``), flushed at once, so a killed run leaves every completed step on disk. It
needs no logger and no network: it is the record that stays when W&B fails (``experiments/base.yaml`` has it).
A resumed run appends to the same file: a step that was trained twice (after the last checkpoint of a killed run,
then again after the resume) appears twice; :func:`read_step_log` keeps the last.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from unigendet.tracking.runs import run_folder


class StepLog(Callback):
    def __init__(self, path: str | None = None, prefix: str = "train/") -> None:
        self.path = Path(path) if path else None
        self.prefix = prefix

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # experiments/base.yaml has a StepLog: one added again (`--trainer.callbacks+=callbacks.StepLog`) with the
        # same file would write every line twice; the first one writes
        earlier = trainer.callbacks[:trainer.callbacks.index(self)] if self in trainer.callbacks else []
        self._duplicate = any(isinstance(c, StepLog) and c.path == self.path and c.prefix == self.prefix
                              for c in earlier)

    def _file(self, trainer: L.Trainer) -> Path:
        if self.path is None:
            self.path = (run_folder(trainer) if trainer.loggers else Path(trainer.default_root_dir)) / "steps.jsonl"
        return self.path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not trainer.is_global_zero or getattr(self, "_duplicate", False):
            return
        row: dict[str, float | int] = {"step": trainer.global_step}
        # the step's own values when training_step returns them (LitUniGenDet does); else the latest logged ones,
        # which keep a metric's last value on steps that did not log it
        values = outputs if isinstance(outputs, Mapping) else trainer.callback_metrics
        for key, value in values.items():
            if key.startswith(self.prefix):
                row[key] = float(value)
        path = self._file(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()


def read_step_log(path: str | Path) -> dict[int, dict[str, float]]:
    """{step: values} from a StepLog file; when a step appears more than once, the last line wins."""
    rows: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            step = int(row.pop("step"))
            rows[step] = {k: (math.nan if v is None else v) for k, v in row.items()}
    return rows
