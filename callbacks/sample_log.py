"""SampleLog: which samples every training step trained on, per rank, as JSON lines (a data audit).

Each rank appends ``{"step": global_step, "rank": r, "samples": [[stream, record epoch, sample id], ...]}`` after
every training batch to ``<folder>/samples.rank<r>.jsonl`` (default folder: the run's, as :class:`StepLog`),
flushed at once. Unlike the other callbacks it writes on every rank: each rank trains on its own shard. Uses:
finding the samples behind a loss spike, and checking that a run resumed on another number of GPUs neither
repeated nor skipped data (``tests/test_reshard_resume.py`` does). A step trained twice (after the last checkpoint
of a killed run, then again after the resume) appears twice; :func:`read_sample_log` keeps the last.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from unigendet.tracking.runs import run_folder


class SampleLog(Callback):
    def __init__(self, folder: str | None = None) -> None:
        self.folder = Path(folder) if folder else None

    def _file(self, trainer: L.Trainer) -> Path:
        if self.folder is None:
            self.folder = run_folder(trainer) if trainer.loggers else Path(trainer.default_root_dir)
        return self.folder / f"samples.rank{trainer.global_rank}.jsonl"

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        packs = batch.items() if isinstance(batch, dict) else [("", batch)]
        samples = []
        for name, b in packs:
            keys = getattr(b, "stats", {}).get("records") or [(None,)] * len(b.sample_ids)
            samples += [[name, key[0], str(sid)] for key, sid in zip(keys, b.sample_ids, strict=True)]
        path = self._file(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rank": trainer.global_rank, "samples": samples}) + "\n")
            f.flush()


def read_sample_log(folder: str | Path) -> dict[tuple[int, int], list[list]]:
    """{(step, rank): samples} of every ``samples.rank*.jsonl`` in ``folder``; a step logged twice keeps its last."""
    rows: dict[tuple[int, int], list[list]] = {}
    for path in sorted(Path(folder).glob("samples.rank*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row["step"], row["rank"])] = row["samples"]
    return rows
