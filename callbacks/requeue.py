"""SafeRequeue: Slurm preemption at a training-step boundary (checkpoint, ``scontrol requeue``, stop).

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint and requeues *inside* the
signal handler, wherever the signal lands: in the middle of an FSDP collective or an import, and in every forked
DataLoader worker too (one ``scontrol requeue`` and one checkpoint writer per process). This callback does the same
work where it is safe:

* the handler (SIGUSR1 by default, ``requeue_signal``) only sets a flag, and only in the process that started fit:
  DataLoader workers inherit the handler, so it compares ``os.getpid()`` with the pid recorded in ``setup``;
* at the end of a training batch (every ``check_every_n_steps``) the ranks agree with one all-reduce (``sum``)
  whether any of them got the signal;
* then every rank calls ``trainer.save_checkpoint(<default_root_dir>/hpc_ckpt_<N>.ckpt)`` (Lightning's name,
  chosen on rank 0 and broadcast), so that the requeued run, under Slurm with ``ckpt_path=None``, resumes from the
  newest hpc checkpoint by itself; older ``hpc_ckpt_*`` are removed once the new one is written;
* rank 0 runs ``scontrol requeue $SLURM_JOB_ID`` (array jobs: ``${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}``);
  a failing ``scontrol`` raises; every rank sets ``trainer.should_stop``;
* outside Slurm (no ``SLURM_JOB_ID``) it saves and stops, with a warning, and requeues nothing;
* a signal at the step that ends training (``max_steps``) changes nothing: the run finishes normally.

Use it with ``SLURMEnvironment(auto_requeue=False)`` (``experiments/slurm/slurm.yaml``); ``setup`` raises when the
cluster environment is a ``SLURMEnvironment`` with ``auto_requeue=True``. Logs go to the ``unigendet.requeue`` logger.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from unigendet.checkpoint.fallback import HPC_NAME, hpc_checkpoints  # noqa: F401  (hpc_checkpoints: public here too)

log = logging.getLogger("unigendet.requeue")
log.setLevel(logging.INFO)
if not logging.getLogger().hasHandlers():
    # as Lightning does for its own logger: a preemption is visible in the job's output without any logging setup;
    # an application that configures the root logger gets the records instead
    log.addHandler(logging.StreamHandler())
    log.propagate = False



def parse_signal(sig: str | int) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"`` or ``10`` -> ``signal.SIGUSR1``."""
    if isinstance(sig, int):
        return signal.Signals(sig)
    name = sig.upper()
    return signal.Signals[name if name.startswith("SIG") else "SIG" + name]


def slurm_job_id() -> str | None:
    """The id ``scontrol requeue`` takes: ``ARRAYJOB_TASK`` for array jobs, else ``SLURM_JOB_ID``; None outside."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job is not None:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def requeue(job_id: str) -> None:
    """``scontrol requeue JOB``; raises RuntimeError with scontrol's output when it fails."""
    cmd = ["scontrol", "requeue", job_id]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as e:
        raise RuntimeError(f"SafeRequeue: cannot run {' '.join(cmd)}: scontrol is not on PATH") from e
    if res.returncode != 0:
        raise RuntimeError(f"SafeRequeue: `{' '.join(cmd)}` failed with exit code {res.returncode}: "
                           f"{(res.stderr or res.stdout).strip()} (was the job submitted with --no-requeue?)")


class SafeRequeue(Callback):
    """On ``requeue_signal``: at the next training-step boundary save ``hpc_ckpt_N``, requeue the Slurm job, stop.

    Args:
        requeue_signal: the signal Slurm sends before the end (``#SBATCH --signal=USR1@90``): a name or a number.
        check_every_n_steps: agree across ranks every this many batches (one tiny all-reduce each time).
        keep_old: keep earlier ``hpc_ckpt_*`` instead of removing them after a successful save.
    """

    def __init__(self, requeue_signal: str | int = "SIGUSR1", check_every_n_steps: int = 1,
                 keep_old: bool = False) -> None:
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.signal = parse_signal(requeue_signal)
        self.check_every_n_steps = check_every_n_steps
        self.keep_old = keep_old
        self.received = False
        self._pid: int | None = None
        self._previous_handler = None

    ####################################################################################################
    # The handler: a flag, in the main process only
    ####################################################################################################

    def _handle(self, signum, frame) -> None:
        if os.getpid() == self._pid:  # forked DataLoader workers inherit this handler: they do nothing
            self.received = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        env = trainer._accelerator_connector.cluster_environment  # the one Lightning's signal handlers look at
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            raise ValueError("SafeRequeue replaces Lightning's signal-handler requeue: add the trainer plugin "
                             "SLURMEnvironment(auto_requeue=False) (experiments/slurm/slurm.yaml does)")
        self._pid = os.getpid()
        self.received = False
        # installed before Lightning registers its handlers (after on_fit_start), which then leave this signal alone
        self._previous_handler = signal.signal(self.signal, self._handle)
        log.info("SafeRequeue: %s handler installed in pid %d (Slurm job %s)", self.signal.name, self._pid,
                 slurm_job_id() or "none")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._pid == os.getpid() and self._previous_handler is not None:
            signal.signal(self.signal, self._previous_handler)
            self._previous_handler = None

    ####################################################################################################
    # At the step boundary: agree, save, requeue, stop
    ####################################################################################################

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % self.check_every_n_steps:
            return
        flag = torch.tensor(float(self.received), device=pl_module.device)
        if float(trainer.strategy.reduce(flag, reduce_op="sum")) == 0:
            return
        self.received = False
        if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            log.info("SafeRequeue: %s at global_step=%d, the last step: finishing normally, no requeue",
                     self.signal.name, trainer.global_step)
            return
        root, rank = trainer.default_root_dir, trainer.global_rank
        path = trainer.strategy.broadcast(trainer._checkpoint_connector.hpc_save_path(root), src=0)
        log.info("SafeRequeue [rank %d]: %s received; saving %s at global_step=%d", rank, self.signal.name, path,
                 trainer.global_step)
        trainer.save_checkpoint(path)
        trainer.strategy.barrier("SafeRequeue.saved")  # every rank's part is on disk before the job goes away
        log.info("SafeRequeue [rank %d]: saved %s at global_step=%d", rank, path, trainer.global_step)
        if trainer.is_global_zero:
            if not self.keep_old:
                self._remove_older(root, Path(path))
            job_id = slurm_job_id()
            if job_id is None:
                log.warning("SafeRequeue: no SLURM_JOB_ID: not under Slurm, nothing to requeue; stopping after %s",
                            path)
            else:
                requeue(job_id)
                log.info("SafeRequeue: requeued Slurm job %s; stopping", job_id)
        trainer.should_stop = True

    @staticmethod
    def _remove_older(root: str | Path, newest: Path) -> None:
        numbers = hpc_checkpoints(root)
        keep = int(HPC_NAME.match(newest.name).group(1))
        for n, p in sorted(numbers.items()):
            if n >= keep:
                continue
            if p.is_dir():  # a sharded (distributed) checkpoint is a folder
                shutil.rmtree(p)
            else:
                p.unlink()
            log.info("SafeRequeue: removed the older %s", p)
