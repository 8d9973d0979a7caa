"""Which units each (rank, worker) shard reads in a record epoch, and how a pass continues on another layout.

A *unit* is what the stream permutes: one record of an in-memory corpus, or one tar shard of a WebDataset corpus
(read sequentially, sample by sample, from a byte offset). A *layout* is the number of reader shards,
``world_size x max(num_workers, 1)``; shard ``k`` of ``K`` reads positions ``k, k+K, k+2K, ...`` of the epoch's
permutation.

A run resumed on another layout (16 GPUs instead of 8, another ``num_workers``) continues the pass it was in:

* every old shard's state says which units of each epoch it took (its position in its work list), which units it
  is still reading (``open``: unit and cursor) and which samples it read but did not train (``pending``);
* :func:`reshard` merges those states into a *carry*: per unfinished epoch, a bitmap of the units taken and the list
  of partial items (units to continue from a cursor, single samples to re-read);
* in a carried epoch, shard ``k'`` of the new layout reads ``partial[k'::K']`` and then the units nobody took,
  ``remainder[k'::K']``; later epochs use the plain permutation again.

Every sample of the pass is therefore trained once: not again (taken units are out of the remainder, read samples
are behind the saved cursors) and not never (open units and pending samples become partial items). A carry resumed
on yet another layout is merged the same way (its partial items not yet taken stay partial).

Carries are plain data (ints, lists, uint8 tensors): they go into checkpoints loaded with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

# a work item: a whole unit (its index), or a partial one [unit, cursor, single]: continue the unit from the cursor,
# or (single) re-read just the sample at the cursor
Item = int | list
Carry = dict[str, Any]  # {"n_shards": K, "epochs": {epoch: {"taken": uint8 bits, "partial": [[u, c, single], ...]}}}


def shard_work(order: Sequence[int], epoch: int, shard: int, n_shards: int, carry: Carry | None) -> list[Item]:
    """Shard ``shard`` of ``n_shards``'s work list in ``epoch``; ``order`` is the epoch's permutation of the units."""
    return slice_work(order, epoch_work(order, epoch, carry), shard, n_shards)


def epoch_work(order: Sequence[int], epoch: int, carry: Carry | None) -> tuple[list[list], list[int]] | None:
    """A carried epoch's partial items and the units nobody took (in the epoch's order); None for a plain epoch."""
    spec = (carry or {}).get("epochs", {}).get(epoch)
    if spec is None:
        return None
    units = np.asarray(order, dtype=np.int64)
    remainder = units[~unpack(spec["taken"], len(units))[units]].tolist()
    return [list(p) for p in spec["partial"]], remainder


def slice_work(order: Sequence[int], carried: tuple[list[list], list[int]] | None, shard: int,
               n_shards: int) -> list[Item]:
    """One shard's share of an epoch: positions ``shard::n_shards`` of the order, or of a carried epoch's partial
    items followed by its remaining units."""
    if carried is None:
        return list(order[shard::n_shards])
    partial, remainder = carried
    return partial[shard::n_shards] + remainder[shard::n_shards]


def initial_state(carry: Carry | None) -> dict[str, Any]:
    """Where every shard of a layout starts: epoch 0, or the first carried epoch."""
    epochs = sorted((carry or {}).get("epochs", {}))
    return {"epoch": epochs[0] if epochs else 0, "pos": 0, "pending": [], "open": [], "turn": 0, "yielded": 0}


def reshard(states: Sequence[dict[str, Any]], carry: Carry | None, order_of: Callable[[int], Sequence[int]],
            n_units: int, n_shards: int) -> Carry:
    """The carry for a new layout of ``n_shards`` shards, from the states of *every* shard of the old layout (in
    shard order; a shard that never reported progress is given :func:`initial_state`) and the old layout's carry.
    ``order_of(epoch)``: the epoch's permutation of the ``n_units`` units."""
    old_k = len(states)
    epochs = {st["epoch"] for st in states}
    epochs |= {k[0] for st in states for k in (*st.get("open", []), *st.get("pending", []))}
    epochs |= {e for e in (carry or {}).get("epochs", {}) if e > min(epochs)}  # carried, not yet begun here
    out: Carry = {"n_shards": n_shards, "epochs": {}}
    for e in range(min(epochs), max(epochs) + 1):
        order = order_of(e)
        spec = (carry or {}).get("epochs", {}).get(e)
        taken = unpack(spec["taken"], n_units).copy() if spec else np.zeros(n_units, dtype=bool)
        carried = epoch_work(order, e, carry)  # once per epoch, not once per old shard
        partial: list[list] = []
        for k, st in enumerate(states):
            work = slice_work(order, carried, k, old_k)
            done = len(work) if e < st["epoch"] else st["pos"] if e == st["epoch"] else 0
            for item in work[:done]:
                if isinstance(item, int):
                    taken[item] = True
            partial += [list(item) for item in work[done:] if not isinstance(item, int)]
            partial += [[u, c, False] for ee, u, c in st.get("open", []) if ee == e]
            partial += [[u, c, True] for ee, u, c in st.get("pending", []) if ee == e]
        if partial or not taken.all():
            out["epochs"][e] = {"taken": pack_bits(taken), "partial": partial}
    if not out["epochs"]:  # every epoch seen is finished: the next one starts plainly
        out["epochs"][max(epochs) + 1] = {"taken": pack_bits(np.zeros(n_units, dtype=bool)), "partial": []}
    return out


def pack_bits(flags: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.packbits(flags.astype(bool)))


def unpack(bits: torch.Tensor, n: int) -> np.ndarray:
    return np.unpackbits(bits.numpy(), count=n).astype(bool)
