"""Atomic checkpoint writes.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system
temp folder; committing it is ``shutil.move``, a copy when the checkpoint folder is on another filesystem (the
usual case on clusters: local /tmp, shared checkpoint storage). A job killed during that copy leaves a truncated
file under the real name, and a killed writer leaves its temporary file in /tmp.

``AtomicCheckpointIO`` serialises into ``.<name>.partial`` next to the target, fsyncs it, then ``os.replace``s it
onto the target and fsyncs the folder: a reader sees the old checkpoint or the new one, never a part. The
partial file of a killed writer is overwritten by the next save. ``LitUniGenDet`` installs it on the trainer's
strategy when the strategy uses the default IO (distributed checkpoints are handled by
:class:`unigendet.strategy.FSDP2Strategy`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial"
    with open(partial, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            raise ValueError(f"{type(self).__name__} writes local paths only, got {path}")
        atomic_torch_save(checkpoint, path)
