"""What every W&B-only callback of this package does the same way.

* :func:`find_wandb` - the trainer's ``WandbLogger``, or None after one notice (rank zero) that the callback is a
  no-op without one.
* :func:`runs_here` - whether this rank takes part in a callback's model work: rank zero only, except under FSDP2,
  where every rank must join the parameter all-gathers (only rank zero then logs).
* :class:`PeriodicWandbCallback` - the triggers of the sampling callbacks: after each validation and/or every N
  training steps.
"""

from __future__ import annotations

import logging

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from unigendet.distributed.sharding import is_sharded

log = logging.getLogger("unigendet.callbacks")


def find_wandb(trainer: L.Trainer, name: str) -> WandbLogger | None:
    logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    if logger is None and trainer.is_global_zero:
        log.info("%s: no WandbLogger configured, the callback is a no-op", name)
    return logger


def runs_here(trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
    return trainer.is_global_zero or is_sharded(pl_module.model)


class PeriodicWandbCallback(Callback):
    """A W&B-only callback whose work, :meth:`log_now`, runs at the end of every validation (not the sanity check)
    when ``self.on_validation`` and/or after every ``self.every_n_steps`` training steps, on the ranks
    :func:`runs_here` names; without a WandbLogger it is a no-op after one notice. Subclasses set both attributes
    in ``__init__`` and define ``log_now``."""

    every_n_steps: int | None = None
    on_validation: bool = True
    _wandb: WandbLogger | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._wandb = find_wandb(trainer, type(self).__name__)

    def _active(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return self._wandb is not None and runs_here(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_validation and not trainer.sanity_checking and self._active(trainer, pl_module):
            self.log_now(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        n = self.every_n_steps
        if n and trainer.global_step % n == 0 and self._active(trainer, pl_module):
            self.log_now(trainer, pl_module)

    def log_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError
