"""Where a run's files go: one folder per run, shared by its config, checkpoints and evaluation report.

The first logger's ``<save_dir>/<name>/<version>`` (for W&B: ``<save_dir>/<project>/<run id>``, where Lightning's
ModelCheckpoint puts ``checkpoints/``), else ``<default_root_dir>/lightning_logs/<time>``.
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import lightning as L

_FOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> its folder, once chosen


def run_folder(trainer: L.Trainer) -> Path:
    """This run's folder, computed on this rank (a logger's version may be known on rank zero only: see
    :func:`shared_run_folder`); the same folder for the trainer's whole life."""
    if trainer not in _FOLDERS:
        if trainer.loggers:
            lg = trainer.loggers[0]
            version = lg.version if isinstance(lg.version, str) else f"version_{lg.version}"
            _FOLDERS[trainer] = Path(lg.save_dir or trainer.default_root_dir) / str(lg.name) / version
        else:
            _FOLDERS[trainer] = Path(trainer.default_root_dir) / "lightning_logs" / time.strftime("%Y%m%d-%H%M%S")
    return _FOLDERS[trainer]


def shared_run_folder(trainer: L.Trainer) -> Path:
    """Rank zero's :func:`run_folder`, on every rank (a broadcast: every rank must call it)."""
    folder = str(run_folder(trainer)) if trainer.is_global_zero else None
    return Path(trainer.strategy.broadcast(folder, src=0))
