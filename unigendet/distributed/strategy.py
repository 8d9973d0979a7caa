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
* every checkpoint folder is sealed with ``SHA256SUMS`` before it is renamed into place (each rank digests a share
  of the files) and verified before it is loaded (each rank checks a share; any damage stops every rank with the
  same one-line error, and ``--ckpt_path last`` falls back to the newest intact checkpoint:
  :mod:`unigendet.checkpoint.fallback`);
* ``save_distributed_checkpoint=False``: one file gathered on rank 0, written atomically;
* every trainable parameter has an optimiser state in the checkpoint (:func:`fill_optimizer_state`): torch's
  loader expects one for each (it initialises them all before loading), while AdamW creates one only at a
  parameter's first gradient, so a stage that leaves some parameters without gradients (GDUF never uses the DIGA
  projection) could not be resumed.

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
from unigendet.checkpoint.fallback import pick
from unigendet.checkpoint.folders import CheckpointError
from unigendet.checkpoint.integrity import digest, seal, verify
from unigendet.checkpoint.lightning_io import AtomicCheckpointIO, refuse_unsafe_load, sweep_leftovers
from unigendet.distributed import failure
from unigendet.distributed.ranks import gather_per_rank


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
        failure.register(self)  # host and pid of each rank, for the message when one fails

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        fill_optimizer_state(optimizer)
        return super().optimizer_state(optimizer)

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
        # every file digested once, the shards split over the ranks; rank 0 seals the folder before renaming it
        names = self.broadcast(sorted(p.name for p in partial.iterdir() if p.is_file()) if self.global_rank == 0
                               else None)  # one listing (shared filesystems may list late on other nodes)
        mine = {name: digest(partial / name) for name in names[self.global_rank::self.world_size]}
        sums = {k: v for part in gather_per_rank(mine) for k, v in part.items()}
        if self.global_rank == 0:
            seal(partial, sums)
            shutil.rmtree(old, ignore_errors=True)
            if path.is_dir():
                os.replace(path, old)
            elif path.exists():
                path.unlink()
            os.replace(partial, path)
            fsync_dir(path.parent)
            sweep_leftovers(path.parent)  # `old`, and what writers killed earlier left
        self.barrier("unigendet_ckpt_done")


    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        weights_only = refuse_unsafe_load(weights_only)
        path = pick(Path(self.broadcast(str(checkpoint_path))), self.checkpoint_io.fallback, self._verify)
        connector = getattr(getattr(self.lightning_module, "_trainer", None), "_checkpoint_connector", None)
        if connector is not None and path != Path(checkpoint_path):
            connector._ckpt_path = str(path)  # Lightning's "Restored all states from ..." names the one loaded
        return super().load_checkpoint(path, weights_only=weights_only)

    def _verify(self, path: Path) -> None:
        """Verify ``path``'s checksums, the files split over the ranks; every rank raises the first damage found."""
        try:
            verify(path, part=(self.global_rank, self.world_size))
            damage = None
        except CheckpointError as e:
            damage = str(e)
        found = [d for d in gather_per_rank(damage) if d]
        if found:
            raise CheckpointError(found[0])


def fill_optimizer_state(optimizer) -> int:
    """Give each trainable parameter that has no optimiser state yet the state it would start with (zeros, step 0),
    shaped like a stepped parameter's; returns how many were filled. Nothing happens before the first step (torch
    then initialises every state itself). Behaviour is unchanged: AdamW skips parameters without gradients and
    starts a state of zeros at step 0 exactly like a fresh one."""
    import torch

    ref = next(((p, optimizer.state[p]) for g in optimizer.param_groups for p in g["params"] if optimizer.state.get(p)),
               None)
    if ref is None:
        return 0
    ref_p, ref_state = ref
    filled = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.requires_grad and not optimizer.state.get(p):
                optimizer.state[p] = {k: (torch.zeros_like(p) if torch.is_tensor(v) and v.shape == ref_p.shape
                                          else torch.zeros_like(v) if torch.is_tensor(v) else type(v)())
                                      for k, v in ref_state.items()}
                filled += 1
    return filled


def register() -> None:
    """Make ``strategy="fsdp2"`` (``--trainer.strategy=fsdp2``) name this strategy with its defaults."""
    from lightning.pytorch.strategies import StrategyRegistry

    if "fsdp2" not in StrategyRegistry:
        StrategyRegistry.register("fsdp2", FSDP2Strategy, description="FSDP2 data parallel, atomic DCP checkpoints")


register()
