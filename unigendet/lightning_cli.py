"""``unigendet fit / validate / test / predict``: LightningCLI over :class:`LitUniGenDet` and any DataModule.

Features:
* configs stack left to right (``--config base.yaml --config gduf.yaml ...``); typed settings (``model_overrides``,
  ``data.gen``, ``model.loss`` ...) merge key by key, and a preset name is checked while the config is parsed;
* errors are one line that names the program (``unigendet fit: error: ...``): parse errors, configuration errors
  raised while the model, data module and trainer are built, callbacks' ``check(model)`` of their settings
  against the model, and a damaged or refused checkpoint (``JSONARGPARSE_DEBUG=true`` gives the traceback);
  errors during training keep their traceback; in a multi-process run every rank also says which rank failed and
  why, and ends within seconds (:mod:`unigendet.distributed.failure`);
* :class:`RunConfig` writes each run's merged ``config.yaml`` into that run's own folder (the logger's run folder,
  else ``<default_root_dir>/lightning_logs/<time>``), never over another run's, and gives it to every logger as the
  run's hyperparameters (the W&B run config: ``model``, ``data``, ``trainer`` ...), with ``val/acc``, ``val/auroc``
  and ``val/f1`` summarised in W&B by their maximum (what a sweep optimises);
* a progress bar that counts training steps of ``max_steps`` (:class:`StepProgressBar`);
* ``--ckpt_path last`` (and Slurm's automatic resume) falls back past damaged checkpoints to the newest intact one
  (:mod:`unigendet.checkpoint.fallback`).
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from unigendet.tracking.runs import run_folder

PROG = "unigendet"
# W&B summaries: the best value of each, not the last (sweeps and run tables read the summary)
WANDB_SUMMARIES = {"val/acc": "max", "val/auroc": "max", "val/f1": "max", "val/loss_ce": "min", "val/loss_mse": "min"}
# errors raised by constructors that mean "this configuration is wrong", shown as one line
CONFIG_ERRORS = (ValueError, FileNotFoundError, MisconfigurationException)

# lines of jsonargparse's nested Union / class errors that repeat what the remaining lines say
_REPEATS = re.compile(r"(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
                      r"Expected a <class 'NoneType'>|Expected a path but)")
_PREFIXES = (re.compile(r'Parser key "(?P<key>[^"]+)":\s*'), re.compile(r"Problem with given class_path '[^']+':\s*"),
             re.compile(r"Not of type \w+:\s*"))


def one_line(message: str) -> str:
    """jsonargparse's (possibly nested, multi-line) message as one line: ``<dotted key>: <the innermost reasons>``."""
    keys: list[str] = []
    reasons: list[str] = []
    for raw in str(message).splitlines():
        line = raw.strip().removeprefix("- ").strip()
        for prefix in _PREFIXES:
            m = prefix.match(line)
            if m:
                if m.groupdict().get("key") and m["key"] not in keys:
                    keys.append(m["key"])
                line = line[m.end():]
        if line and not _REPEATS.match(line) and line not in reasons:
            reasons.append(line)
    text = "; ".join(reasons) or " ".join(str(message).split())
    return f"{'.'.join(keys)}: {text}" if keys else text


def _debug() -> bool:
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false")


class ArgumentParser(LightningArgumentParser):
    """Errors as ``unigendet fit: error: <one line>`` instead of the full usage text."""

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or _debug():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        sys.stderr.write(f"{parser.prog.replace(' [options]', '')}: error: {one_line(message)}\n")
        self.exit(2)


#####################################################################################################
# The run's config: its own folder, and W&B
#####################################################################################################


class RunConfig(SaveConfigCallback):
    """Saves the merged config as ``config.yaml`` in the run's own folder (:func:`run_folder`) and, with a
    WandbLogger, as the W&B run config (``model``, ``data``, ``trainer``, ... as in the file)."""

    def __init__(self, parser: LightningArgumentParser, config, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(parser, config, **kwargs)
        self.path: Path | None = None

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import yaml
        from lightning.pytorch.loggers import WandbLogger

        folder = run_folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / self.config_filename
        text = self.parser.dump(self.config, skip_none=False)  # what --print_config prints
        self.path.write_text(text)
        merged = yaml.safe_load(text)
        for lg in trainer.loggers:  # instead of the module's hyperparameters (autolog is off, see UniGenDetCLI)
            lg.log_hyperparams(merged)
            if isinstance(lg, WandbLogger):
                run = lg.experiment
                for key, summary in WANDB_SUMMARIES.items():
                    run.define_metric(key, summary=summary, step_metric="trainer/global_step")
                run_dir = Path(run.dir).parent  # .../wandb/<offline-run-...>/files -> the run's folder
                if run.settings.mode in ("offline", "dryrun"):
                    print(f"W&B run {run.id} (offline): {run_dir}; upload it with `wandb sync {run_dir}`",
                          file=sys.stderr)
                else:
                    print(f"W&B run {run.id}: {run.url}", file=sys.stderr)


#####################################################################################################
# Progress in steps
#####################################################################################################


class StepProgressBar(TQDMProgressBar):
    """The training bar counts optimisation steps up to ``max_steps`` (the runs are step-based: a loader "epoch"
    is only how the streams are sized), and says which step the run is at."""

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if not (trainer.max_steps and trainer.max_steps > 0):
            return super().on_train_epoch_start(trainer)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description("Training", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.initial = 0
        bar.n = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if trainer.max_steps and trainer.max_steps > 0:
            if self._should_update(trainer.global_step, bar.total) or trainer.global_step >= bar.total:
                bar.n = trainer.global_step
                bar.set_postfix(self.get_metrics(trainer, pl_module))
                bar.refresh()
        else:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return items


#####################################################################################################
# The CLI
#####################################################################################################


class UniGenDetCLI(LightningCLI):
    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        from unigendet.training.module import LitUniGenDet

        kwargs.setdefault("parser_kwargs", {"prog": PROG})
        super().__init__(LitUniGenDet, L.LightningDataModule, subclass_mode_data=True, args=args, run=run,
                         parser_class=ArgumentParser, save_config_callback=RunConfig,
                         auto_configure_optimizers=False, **kwargs)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            for callback in self.trainer.callbacks:  # settings a callback can check against the model, now
                if callable(getattr(callback, "check", None)):
                    callback.check(self.model)
        except CONFIG_ERRORS as e:
            if _debug():
                raise
            self._parser(self.subcommand).error(f"{type(e).__name__}: {e}" if not isinstance(e, ValueError)
                                                else str(e))

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of a --ckpt_path file while parsing: verify the file first
        from unigendet.checkpoint.integrity import verify_file

        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            verify_file(ckpt_path)
        super()._parse_ckpt_path()

    def before_fit(self) -> None:
        self._plan_resume()

    def before_validate(self) -> None:
        self._plan_resume()

    def before_test(self) -> None:
        self._plan_resume()

    def _plan_resume(self) -> None:
        """``--ckpt_path last`` (and Slurm's resume from ``hpc_ckpt_N``): Lightning's own choice, named explicitly,
        with the other checkpoints to fall back to when it turns out to be damaged
        (:mod:`unigendet.checkpoint.fallback`)."""
        from unigendet.checkpoint.fallback import pick, plan
        from unigendet.checkpoint.integrity import verify
        from unigendet.checkpoint.lightning_io import AtomicCheckpointIO, use_atomic_checkpoint_io

        config = self.config_init[self.subcommand]
        fallback = plan(self.trainer, config.get("ckpt_path"))
        if fallback is None:
            return
        use_atomic_checkpoint_io(self.trainer.strategy)
        io = self.trainer.strategy.checkpoint_io
        if not isinstance(io, AtomicCheckpointIO):  # a custom checkpoint IO of the user's is left alone
            return
        io.fallback = fallback  # also tells LitUniGenDet that this resume is automatic
        if self.trainer.num_devices * self.trainer.num_nodes == 1:  # one process: choose now, so that Lightning's
            config["ckpt_path"] = str(pick(fallback.chosen, fallback, verify))  # own messages name the one loaded
        else:  # each rank verifies a share once the process group exists (FSDP2Strategy.load_checkpoint)
            config["ckpt_path"] = str(fallback.chosen)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> L.Trainer:
        # RunConfig logs the whole merged config (model, data, trainer); Lightning's own logging of the module's
        # hyperparameters would then overwrite its "model" section with the preset name
        config["enable_autolog_hparams"] = False
        if config.get("enable_progress_bar") is not False and not any(
                isinstance(c, ProgressBar) for c in [*(config.get("callbacks") or []), *callbacks]):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)


def lightning_main(argv: list[str]) -> int:
    """``unigendet fit|validate|test|predict ...``."""
    import unigendet.distributed.strategy  # noqa: F401  (registers strategy="fsdp2")
    from unigendet.checkpoint.folders import CheckpointError
    from unigendet.distributed import failure

    try:
        UniGenDetCLI(args=argv)
    except CheckpointError as e:  # a damaged or refused checkpoint: one line naming the file
        if _debug():
            raise
        sys.stderr.write(f"{PROG} {argv[0] if argv else ''}: error: {' '.join(str(e).split())}\n")
        return 2
    except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
        line = None if isinstance(e, (SystemExit, KeyboardInterrupt)) else failure.report(e)
        if line is None:  # one process, or an exit: as Python would
            raise
        # a multi-process run: the traceback, then which rank failed and why, and an exit within seconds
        traceback.print_exception(e)
        sys.stderr.write(f"{PROG} {argv[0]}: {line}\n")
        sys.stderr.flush()
        failure.stop_launched_ranks()
        failure.exit_within(20.0)
        return 1
    return 0
