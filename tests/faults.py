"""A fault on one rank, for the multi-process tests (added to a run as ``--trainer.callbacks+=tests.faults.Fault``).

Kinds, each on rank ``rank`` only, at training step ``step``:
* ``raise``: an exception in the middle of the step (before the backward pass);
* ``sigkill``: SIGKILL in the middle of the step, as the out-of-memory killer would;
* ``write``: from the end of the step on, this process may not write files larger than 64 KiB (RLIMIT_FSIZE,
  with SIGXFSZ ignored, so the write fails with EFBIG), so its shard of the step's distributed checkpoint fails
  to write while the other ranks' succeed: a full disk under one rank.
The time of the fault goes to ``marker`` (a file), for the test to measure how long the other ranks took to end.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from pathlib import Path

import lightning as L


class Fault(L.Callback):
    def __init__(self, kind: str, rank: int, step: int, marker: str) -> None:
        if kind not in ("raise", "sigkill", "write"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self.kind, self.rank, self.step, self.marker = kind, rank, step, Path(marker)
        self._training = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._training = trainer.global_step + 1  # the step being trained (its updates move global_step within it)

    def _due(self, trainer: L.Trainer) -> bool:
        return trainer.global_rank == self.rank and self._training == self.step

    def _mark(self) -> None:
        self.marker.write_text(f"{time.time()}\n")

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss) -> None:
        if self.kind in ("raise", "sigkill") and self._due(trainer):
            self._mark()
            if self.kind == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"injected fault on rank {self.rank} at step {self.step}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:  # runs before ModelCheckpoint (the last callback) saves
        if self.kind == "write" and trainer.global_rank == self.rank and trainer.global_step == self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            self._mark()
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
