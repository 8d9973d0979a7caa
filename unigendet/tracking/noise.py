"""Third-party warnings and tips that a normal ``unigendet`` run silences: the ONE place where they are filtered.

Each entry names the message, where it comes from and why it tells a user of this project nothing they can act on.
Only these messages are filtered, so new warnings (ours, or new ones from a library) still show. :func:`install`
runs at CLI start-up (``unigendet ...``, ``python -m unigendet ...``, ``make demo``); ``tests/conftest.py`` installs
the same filters, and ``tests/test_quiet.py`` checks that each of them still matches what its library prints.

W&B's own status lines are switched off with ``WANDB_SILENT=true`` unless the environment sets it; the run folder and
the ``wandb sync`` command are printed by ``unigendet`` itself (:class:`unigendet.lightning_cli.RunConfig`).
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import NamedTuple


class Noise(NamedTuple):
    message: str  # a regex matched at the start of the message
    source: str  # the package whose code prints it
    why: str
    category: type[Warning] = UserWarning
    printed_as: str | None = None  # how the text appears in that code when it is built at run time


WARNINGS: list[Noise] = [
    Noise(r"LightningCLI's args parameter is intended to run from within Python", "lightning.pytorch.cli",
          "`unigendet` hands its argv to LightningCLI and must leave sys.argv as it is: Lightning's subprocess "
          "launcher re-executes sys.argv to start ranks 1..N-1"),
    Noise(r"'set_vital' is deprecated", "torch",
          "torchdata 0.11's StatefulDataLoader calls torch.set_vital, which torch deprecates; nothing to change here",
          printed_as="is deprecated, please do not call"),
    Noise(r"`isinstance\(treespec, LeafSpec\)` is deprecated", "torch",
          "Lightning's _pytree helper uses a torch API that newer torch deprecates", FutureWarning),
    Noise(r"Your `IterableDataset` has `__len__` defined", "lightning.pytorch.utilities.data",
          "generic advice; our streams shard records by (rank, loader worker), so their length is exact"),
    Noise(r"Length of IterableDataset <data_modules\.", "torch",
          "after a resume at the end of a loader epoch, StatefulDataLoader counts the restored epoch's batches into "
          "the next one; the data positions are our streams' own and a resume repeats the uninterrupted run "
          "exactly (tests/test_resume.py)", printed_as="was reported to be"),
    Noise(r"Using ModelCheckpoint with manual optimization and every_n_train_steps", "lightning.pytorch.callbacks",
          "a checkpoint after the step's updates is exactly what exact resume needs (tests/test_resume.py)"),
    Noise(r"The `srun` command is available on your system but is not used", "lightning.fabric.plugins",
          "printed on any machine with Slurm installed; the sbatch templates start every multi-process run with "
          "srun, and single-process runs need none"),
]

# only when a checkpoint is evaluated (`unigendet test / validate / predict --ckpt_path ...`), not when training resumes
EVALUATION_WARNINGS: list[Noise] = [
    Noise(r"The dirpath has changed from", "lightning.pytorch.callbacks",
          "evaluating a checkpoint restores its ModelCheckpoint state into a run with another folder (a new W&B run "
          "id, or no logger); an evaluation saves no checkpoints, so the top-k bookkeeping it drops is unused. A "
          "resumed fit still shows it"),
]

# rank_zero_info lines (logger "lightning.pytorch.utilities.rank_zero") that advertise other products
LOG_LINES: list[Noise] = [
    Noise("💡 Tip: For seamless cloud", "lightning.pytorch.trainer.connectors",
          "advertises litlogger / litmodels, which this project does not use"),
]


class _DropLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(n.message) for n in LOG_LINES)


_LINE_FILTER = _DropLines()
LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


def install(evaluation: bool = False) -> None:
    """Filter the warnings above (idempotent; with ``evaluation`` also :data:`EVALUATION_WARNINGS`) and quiet W&B's
    status lines unless ``WANDB_SILENT`` is set."""
    for n in [*WARNINGS, *(EVALUATION_WARNINGS if evaluation else [])]:
        category = n.category
        # Lightning's rank_zero_warn uses its own subclasses of UserWarning; filter the whole family
        warnings.filterwarnings("ignore", message=n.message, category=Warning if category is UserWarning else category)
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if _LINE_FILTER not in logger.filters:
            logger.addFilter(_LINE_FILTER)
    os.environ.setdefault("WANDB_SILENT", "true")
