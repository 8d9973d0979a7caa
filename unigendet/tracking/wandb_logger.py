"""WandbLogger that picks online or offline the way W&B itself would, for ``experiments/base.yaml``.

* ``offline=None`` (the default) decides from W&B's own settings: ``WANDB_MODE`` wins when it is set (``offline``,
  ``online``, ``disabled``); otherwise the run is online when an API key is configured (``WANDB_API_KEY``, or a
  ``~/.netrc`` entry for the host of ``WANDB_BASE_URL``, which ``wandb login`` writes) and offline when none is,
  so a machine without credentials never stops to ask for them;
* the run files go under ``save_dir`` (``runs`` by default, next to the checkpoints), the project defaults to
  ``unigendet`` (``WANDB_PROJECT`` overrides it);
* ``version`` (the W&B run id) defaults to ``WANDB_RUN_ID``; the run folder is ``<save_dir>/<project>/<run id>``;
* no ``anonymous`` argument reaches ``wandb.init`` unless it is asked for (W&B deprecated the setting);
* **W&B never stops training.** An ``OSError`` from W&B while logging (its service process died: ``Connection
  lost``; its run folder cannot be written: a full disk, a read-only mount) is logged once, with the step from
  which W&B records are lost; from then on nothing more goes to W&B in this run and the run ends with a count of
  what was lost. W&B itself loses records silently when the disk under its run folder fills (its service drops
  them and says nothing), so rank 0 writes a small probe file into the run folder every ``probe_every_s`` seconds
  while logging, which finds that. Training, checkpoints and ``callbacks.StepLog``'s ``steps.jsonl`` go on.
"""

from __future__ import annotations

import logging
import netrc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

DEFAULT_BASE_URL = "https://api.wandb.ai"
PROBE = ".unigendet-write-probe"
log = logging.getLogger("unigendet.wandb")


def wandb_credentials() -> bool:
    """True when W&B has an API key: ``WANDB_API_KEY``, or a netrc entry for the server's host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return bool(host) and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wants_offline() -> bool:
    """What ``offline=None`` means: W&B's ``WANDB_MODE`` when set, else offline exactly when there are no credentials.
    With ``WANDB_MODE`` set the logger stays "online" and wandb.init applies that mode itself."""
    if os.environ.get("WANDB_MODE"):
        return False
    return not wandb_credentials()


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger; ``offline=None`` follows W&B's environment, and a W&B failure never stops training
    (see the module docstring). ``probe_every_s``: how often rank 0 checks that the W&B run folder can be written.
    """

    def __init__(self, name: str | None = None, save_dir: str = "runs", version: str | None = None,
                 offline: bool | None = None, project: str | None = None, log_model: bool | str = False,
                 probe_every_s: float = 30.0, **kwargs: Any) -> None:
        self.requested_offline = offline
        offline = wants_offline() if offline is None else offline
        project = project or os.environ.get("WANDB_PROJECT") or "unigendet"
        # a run id fixed by the environment (the sbatch templates: one per Slurm job, kept across requeues) is the
        # version from the start, so the run folder and `--ckpt_path last` are known before wandb.init
        version = version or os.environ.get("WANDB_RUN_ID") or None
        super().__init__(name=name, save_dir=save_dir, version=version, offline=offline, project=project,
                         log_model=log_model, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        self.probe_every_s = probe_every_s
        self.failure: str | None = None  # what stopped W&B, once it has
        self.lost_calls = 0
        self._lost_steps: tuple[int, int] | None = None  # (first, last) step whose records were lost
        self._next_probe = 0.0
        self._summarised: int | None = None

    #################################################################################################
    # W&B failures cost log records, never the run
    #################################################################################################

    def _guarded(self, what: str, step: int | None, fn: Callable[[], Any]) -> Any:
        if self.failure is None:
            try:
                if what == "metrics":
                    self._probe()
                return fn()
            except OSError as e:  # ConnectionResetError (service gone), ENOSPC / EROFS / EACCES (run folder)
                self.fail(e, what, step)
        self.lost_calls += 1
        if step is not None:
            first, last = self._lost_steps or (step, step)
            self._lost_steps = (min(first, step), max(last, step))
        return None

    def fail(self, error: BaseException, what: str = "records", step: int | None = None) -> None:
        """Stop using W&B for the rest of the run after ``error`` (logged once); training goes on."""
        if self.failure is not None:
            return
        self.failure = f"{type(error).__name__}: {error}"
        folder = self._run_folder()
        log.warning("W&B stopped working at step %s while logging %s (%s)%s: nothing more goes to W&B in this run; "
                    "training goes on, checkpoints are written as configured and every step's train/* values go on "
                    "to steps.jsonl (callbacks.StepLog)", step, what, self.failure,
                    f"; what W&B wrote before that is in {folder}" if folder else "")
        self._close_quietly()

    def _run_folder(self) -> Path | None:
        run = self._experiment
        try:
            return Path(run.dir).parent if run is not None and run.dir else None
        except (AttributeError, OSError):  # a run object whose service is gone may not answer
            return None

    def _probe(self) -> None:
        """Write and remove a small file in the W&B run folder (every ``probe_every_s``): W&B's service drops
        records it cannot write without telling anyone."""
        now = time.monotonic()
        if now < self._next_probe or self._experiment is None:
            return
        self._next_probe = now + self.probe_every_s
        folder = self._run_folder()
        if folder is None:
            return
        path = folder / PROBE
        try:
            with open(path, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            path.unlink(missing_ok=True)

    def _close_quietly(self) -> None:
        """Detach W&B once it has failed: stop its copy of the console into the run folder, silence its own logger
        (whose file is in that folder: every record would print a "Logging error" traceback), and close its
        connection now rather than in an exit hook that prints a traceback about the dead service. Errors here are
        about what already failed and change nothing."""
        import wandb

        restore = getattr(self._experiment, "_restore", None)  # W&B's console capture (a private method)
        wandb_log = logging.getLogger("wandb")
        for handler in list(wandb_log.handlers):
            wandb_log.removeHandler(handler)
        wandb_log.addHandler(logging.NullHandler())
        wandb_log.propagate = False
        for step in (restore, wandb.teardown):
            try:
                if callable(step):
                    step()
            except (OSError, AssertionError, RuntimeError) as e:
                log.debug("detaching W&B after its failure: %s", e)

    def log_hyperparams(self, params: Any) -> None:
        self._guarded("hyperparameters", None, lambda: super(WandbLogger, self).log_hyperparams(params))

    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        self._guarded("metrics", step, lambda: super(WandbLogger, self).log_metrics(metrics, step))

    def log_table(self, *args: Any, step: int | None = None, **kwargs: Any) -> None:
        self._guarded("a table", step, lambda: super(WandbLogger, self).log_table(*args, step=step, **kwargs))

    def log_text(self, *args: Any, step: int | None = None, **kwargs: Any) -> None:
        self._guarded("a text table", step, lambda: super(WandbLogger, self).log_text(*args, step=step, **kwargs))

    def log_image(self, key: str, images: list[Any], step: int | None = None, **kwargs: Any) -> None:
        self._guarded("images", step, lambda: super(WandbLogger, self).log_image(key, images, step=step, **kwargs))

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        self._guarded("a checkpoint artifact", None,
                      lambda: super(WandbLogger, self).after_save_checkpoint(checkpoint_callback))

    def finalize(self, status: str) -> None:
        if self.failure is not None:
            if self._summarised != self.lost_calls:  # Lightning may finalize more than once
                steps = f" (steps {self._lost_steps[0]} to {self._lost_steps[1]})" if self._lost_steps else ""
                log.warning("W&B lost %d logging calls%s after it stopped (%s)", self.lost_calls, steps,
                            self.failure)
                self._summarised = self.lost_calls
            return
        self._guarded("the run's end", None, lambda: super(WandbLogger, self).finalize(status))
