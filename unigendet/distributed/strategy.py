"""FSDP2Strategy: Lightning's ModelParallelStrategy set up for data-parallel FSDP2, with atomic checkpoints.

Features:
* ``data_parallel_size`` defaults to every process (nodes x devices) and ``tensor_parallel_size`` to 1: the
  parent's "auto" builds a tensor-parallel mesh over a node's devices, which leaves FSDP unsharded within a node
  and hands every rank the same batches;
* distributed checkpoints (torch.distributed.checkpoint: one shard file per rank + rank 0's ``meta.pt``) are
  written into ``.<name>.partial`` and renamed into place by rank 0 once every rank has finished, the previous
  checkpoint moved aside first and removed last: a kill at any moment leaves the old checkpoint or the new one
  under the name, never a half-written one (Lightning writes into the final folder directly); they load on any
  number of processes (the shards are resharded on load);
* ``save_distributed_checkpoint=False``: one file gathered on rank 0, written atomically.

Registered as ``fsdp2`` when this module is imported (``python -m unigendet fit`` does):
``--trainer.strategy=fsdp2``, or in YAML with arguments::

    trainer:
      strategy: {class_path: unigendet.distributed.strategy.FSDP2Strategy, init_args: {save_distributed_checkpoint:
      true}}
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from unigendet.checkpoint.atomic import fsync_dir
from unigendet.checkpoint.lightning_io import AtomicCheckpointIO, refuse_unsafe_load


class FSDP2Strategy(ModelParallelStrategy):
    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int | str = 1,
                 save_distributed_checkpoint: bool = True, **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.checkpoint_io = AtomicCheckpointIO()

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        partial = path.parent / f".{path.name}.partial"
        old = path.parent / f".{path.name}.old"
        if self.global_rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
        self.barrier("unigendet_ckpt_start")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("unigendet_ckpt_written")
        if self.global_rank == 0:
            shutil.rmtree(old, ignore_errors=True)
            if path.is_dir():
                os.replace(path, old)
            elif path.exists():
                path.unlink()
            os.replace(partial, path)
            fsync_dir(path.parent)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("unigendet_ckpt_done")


    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(checkpoint_path, weights_only=refuse_unsafe_load(weights_only))


def register() -> None:
    """Make ``strategy="fsdp2"`` (``--trainer.strategy=fsdp2``) name this strategy with its defaults."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 data parallel, atomic DCP checkpoints")


register()
