"""``--ckpt_path last`` (and Slurm's automatic resume) that never loads a damaged checkpoint.

Lightning resolves ``last`` to the newest ``last*.ckpt`` in the run's ModelCheckpoint folders, and under Slurm with
no ``ckpt_path`` to the highest ``hpc_ckpt_N``, and loads it whatever its state. Here:
* :func:`plan` (the CLI calls it before ``fit`` / ``validate`` / ``test``) makes Lightning's own choice and lists
  every other checkpoint of those folders (``last``, top-k, ``hpc_ckpt_N``; files and distributed folders), newest
  first;
* :func:`pick` (the checkpoint loaders call it: :class:`~unigendet.checkpoint.lightning_io.AtomicCheckpointIO`,
  :class:`~unigendet.distributed.strategy.FSDP2Strategy`) verifies the chosen one
  (:mod:`unigendet.checkpoint.integrity`) and, when it is damaged, warns and takes the newest intact one of the
  others; with none intact it raises the first damage found. An explicit ``--ckpt_path FILE`` is verified and never
  replaced.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from unigendet.checkpoint.folders import CheckpointError

log = logging.getLogger("unigendet.checkpoint")


@dataclass
class Fallback:
    chosen: Path  # Lightning's own choice for "last" / the Slurm resume
    others: list[Path] = field(default_factory=list)  # newest first


def checkpoints_in(folder: str | Path) -> list[Path]:
    """The checkpoints in ``folder``: ``*.ckpt`` files and distributed-checkpoint folders (with ``meta.pt``), not
    the hidden partial ones of a write in progress."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.endswith(".ckpt") and not p.name.startswith(".")
            and (p.is_file() or (p / "meta.pt").is_file())]


HPC_NAME = re.compile(r"^hpc_ckpt_(\d+)\.ckpt$")  # Lightning's name for a Slurm requeue checkpoint


def hpc_checkpoints(folder: str | Path) -> dict[int, Path]:
    """{N: path} of the ``hpc_ckpt_N.ckpt`` files (or sharded folders) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {int(m.group(1)): p for p in folder.iterdir() if (m := HPC_NAME.match(p.name))}


def _mtime(path: Path) -> float:
    try:
        return (path / "meta.pt" if path.is_dir() else path).stat().st_mtime
    except OSError:
        return 0.0


def plan(trainer, ckpt_path: str | None) -> Fallback | None:
    """The fallback plan for ``ckpt_path`` ("last", or None under Slurm with an hpc checkpoint); None for an explicit
    path, for "best", and when there is no checkpoint yet (Lightning then starts from scratch, as before)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment
    from lightning.pytorch.callbacks import ModelCheckpoint

    slurm_resume = ckpt_path is None and SLURMEnvironment.detect()
    if ckpt_path != "last" and not slurm_resume:
        return None
    hpc = hpc_checkpoints(trainer.default_root_dir)
    folders = {Path(trainer.default_root_dir)}
    lasts: set[Path] = set()
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint):
            found = {Path(p) for p in cb._find_last_checkpoints(trainer)}  # what Lightning's "last" looks at
            lasts |= found
            folders |= {p.parent for p in found} | ({Path(cb.dirpath)} if cb.dirpath else set())
    if ckpt_path == "last" and lasts:
        chosen = max(lasts, key=_mtime)
    elif slurm_resume and hpc:
        chosen = hpc[max(hpc)]
    else:
        return None
    others = {p.resolve(): p for folder in folders for p in checkpoints_in(folder)}
    others.pop(chosen.resolve(), None)
    return Fallback(chosen, sorted(others.values(), key=_mtime, reverse=True))


def pick(path: str | Path, fallback: Fallback | None, check: Callable[[Path], object]) -> Path:
    """The checkpoint to load: ``path`` when ``check`` (raising :class:`CheckpointError`) passes it; when it is the
    ``fallback``'s choice and damaged, the newest of the others that passes, with a warning."""
    path = Path(path)
    try:
        check(path)
        return path
    except CheckpointError as damage:
        if fallback is None or path.resolve() != fallback.chosen.resolve():
            raise
        first = damage
    for other in fallback.others:
        try:
            check(other)
        except CheckpointError as e:
            log.warning("skipping a damaged checkpoint too: %s", e)
            continue
        log.warning("%s; resuming from the newest intact checkpoint instead: %s", first, other)
        return other
    raise CheckpointError(f"{first} (and no intact checkpoint to fall back to among {len(fallback.others)} others)")
