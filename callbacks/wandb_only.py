"""What every W&B-only callback of this package does the same way.

* :func:`find_wandb` - the trainer's ``WandbLogger``, or None after one notice (rank zero) that the callback is a
  no-op without one.
* :func:`runs_here` - whether this rank takes part in a callback's model work: rank zero only, except under FSDP2,
  where every rank must join the parameter all-gathers (only rank zero then logs).
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from unigendet.sharding import is_sharded

log = logging.getLogger("unigendet.callbacks")


def find_wandb(trainer: L.Trainer, name: str) -> WandbLogger | None:
    logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    if logger is None and trainer.is_global_zero:
        log.info("%s: no WandbLogger configured, the callback is a no-op", name)
    return logger


def runs_here(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    return trainer.is_global_zero or is_sharded(pl_module.model)
