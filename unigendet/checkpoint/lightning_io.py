"""Atomic checkpoint writes.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lives in the system
temp folder; committing it is ``shutil.move``, a copy when the checkpoint folder is on another filesystem (the
usual case on clusters: local /tmp, shared checkpoint storage). A job killed during that copy leaves a truncated
file under the real name, and a killed writer leaves its temporary file in /tmp.

``AtomicCheckpointIO`` serialises into ``.<name>.partial`` next to the target, fsyncs it, then ``os.replace``s it
onto the target and fsyncs the folder: a reader sees the old checkpoint or the new one, never a part. The
partial file of a killed writer is overwritten by the next save. :func:`unigendet.checkpoint.atomic.atomic_path` is that
procedure for any writer, and the project's only one: checkpoints, exported safetensors and json, tokenizer copies,
cached weights. ``LitUniGenDet`` installs it on the trainer's
strategy when the strategy uses the default IO (distributed checkpoints are handled by
:class:`unigendet.distributed.strategy.FSDP2Strategy`). A failed write removes its partial file and says so; loading is
``weights_only=True`` only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from unigendet.checkpoint.atomic import atomic_path


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
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):
            raise ValueError(f"{type(self).__name__} writes local paths only, got {path}")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict:
        weights_only = refuse_unsafe_load(weights_only)
        if Path(path).is_dir():  # an FSDP2 folder, read by a process without FSDP2 (e.g. `unigendet test`)
            raise ValueError(f"{path} is a distributed (FSDP2) checkpoint folder: load it with "
                             "--trainer.strategy=fsdp2 (on any number of processes), or export it "
                             "(`unigendet export --ckpt FOLDER --out DIR`) and use --model.init_from=DIR")
        kwargs = {} if map_location is None else {"map_location": map_location}
        return super().load_checkpoint(path, weights_only=weights_only, **kwargs)


def use_atomic_checkpoint_io(strategy) -> None:
    """Make a strategy's checkpoint writes atomic, when it uses Lightning's default IO (a custom IO is kept)."""
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
