"""Atomic checkpoint writes.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system
temp folder; committing it is ``shutil.move``, a copy when the checkpoint folder is on another filesystem (the
usual case on clusters: local /tmp, shared checkpoint storage). A job killed during that copy leaves a truncated
file under the real name, and a killed writer leaves its temporary file in /tmp.

``AtomicCheckpointIO`` serialises into ``.<name>.partial`` next to the target, fsyncs it, then ``os.replace``s it
onto the target and fsyncs the folder: a reader sees the old checkpoint or the new one, never a part. The
partial file of a killed writer is overwritten by the next save. :func:`unigendet.checkpoint.atomic.atomic_path` is
that procedure for any writer, and the project's only one: checkpoints, exported safetensors and json, tokenizer
copies, cached weights. ``LitUniGenDet`` installs it on the trainer's strategy when the strategy uses the default
IO (distributed checkpoints are handled by :class:`unigendet.distributed.strategy.FSDP2Strategy`). A failed write
removes its partial file and says so. Loading is ``weights_only=True`` only, after the file's CRC-32s are verified
(:mod:`unigendet.checkpoint.integrity`); ``--ckpt_path last`` falls back past a damaged file
(:mod:`unigendet.checkpoint.fallback`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unigendet.checkpoint.atomic import atomic_path
from unigendet.checkpoint.fallback import Fallback, pick
from unigendet.checkpoint.folders import CheckpointError
from unigendet.checkpoint.integrity import verify_file


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through :func:`atomic_path`."""
    with atomic_path(path, what="checkpoint") as partial, open(partial, "wb") as f:
        torch.save(obj, f)


def refuse_unsafe_load(weights_only: bool | None) -> bool:
    """Checkpoints are loaded with ``weights_only=True`` only: a checkpoint from elsewhere must not run code."""
    if weights_only is False:
        raise ValueError("unigendet loads checkpoints with weights_only=True only (a pickled object in a checkpoint "
                         "could run code); its own checkpoints need nothing else")
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    fallback: Fallback | None = None  # set by the CLI for --ckpt_path last (unigendet.checkpoint.fallback)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            raise ValueError(f"{type(self).__name__} writes local paths only, got {path}")
        atomic_torch_save(checkpoint, path)
        sweep_leftovers(Path(path).parent)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        weights_only = refuse_unsafe_load(weights_only)
        if Path(path).is_dir():  # an FSDP2 folder, read by a process without FSDP2 (e.g. `unigendet test`)
            raise ValueError(f"{path} is a distributed (FSDP2) checkpoint folder: load it with "
                             "--trainer.strategy=fsdp2 (on any number of processes), or export it "
                             "(`unigendet export --ckpt FOLDER --out DIR`) and use --model.init_from=DIR")
        path = pick(path, self.fallback, _verify_single_file)
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=weights_only, **kwargs)

    def remove_checkpoint(self, path) -> None:
        """Remove an old checkpoint (ModelCheckpoint's retention) as one step: renamed to a hidden name first, then
        deleted, so that a kill during the deletion never leaves a half-deleted checkpoint under its real name."""
        path = Path(path)
        if not path.exists():
            return
        doomed = path.parent / f".{path.name}.removing"
        if doomed.exists():
            shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()
        os.replace(path, doomed)
        shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()


def _verify_single_file(path: Path) -> None:
    if path.is_dir():  # a fallback candidate this process cannot load
        raise CheckpointError(f"{path}: a distributed (FSDP2) checkpoint folder, not loadable without FSDP2")
    verify_file(path)


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove what killed checkpoint writers and deletions left in ``folder`` (``.<name>.ckpt.partial``,
    ``.removing``, ``.old``: hidden, never loaded, possibly as large as a checkpoint). Called after a save has
    completed, by the only writer of the folder, so none of them is in use."""
    gone = []
    for p in folder.glob(".*.ckpt.*"):
        if p.suffix in (".partial", ".removing", ".old"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def use_atomic_checkpoint_io(strategy) -> None:
    """Make a strategy's checkpoint writes atomic, when it uses Lightning's default IO (a custom IO is kept)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
