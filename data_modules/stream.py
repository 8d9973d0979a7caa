"""A resumable stream of token-budget packed batches.

Features:
* records are metadata only; a ``planner`` turns one record into a ``SamplePlan`` (decoding its image) or ``None``
  (a counted skip), or into several named plans (``{"gen": student, "teacher": teacher}``), packed side by side;
* each pass over the records ("record epoch") uses a permutation seeded by (seed, epoch); the permutation is split
  disjointly over (rank, dataloader worker): shard k of K takes positions k, k+K, k+2K, ...;
* token-budget packing with an overflow buffer: a sample that does not fit waits for the next pack; a sample longer
  than ``max_sample_tokens`` (or the budget) is skipped and counted (``too_many_tokens``);
* every random choice of a record (caption dropout, timesteps) comes from a generator seeded by (seed, epoch, index),
  so a record planned again after a resume is planned identically;
* exact mid-epoch resume: ``state_dict()`` (called inside each worker by torchdata's ``StatefulDataLoader``, the
  loader Lightning checkpoints) holds the record epoch, the position, the pending (overflow) records, the packs
  yielded in the current loader epoch and the skip counts; ``load_state_dict`` continues with exactly the next
  samples;
* progress survives loader epochs: DataLoader workers are new processes every loader epoch, started from the
  main process's copy of the stream, so each pack carries its worker's state (``stats["stream_state"]``), the
  main process records the state of every pack it trains on (:meth:`record`), and the next loader epoch's
  workers start from it; :meth:`progress` / :meth:`set_progress` carry it through checkpoints (Lightning does
  not restore loader state for a checkpoint taken at the end of a loader epoch);
* ``__len__`` is the number of packs per loader epoch on this rank (each worker yields its share): Lightning skips
  its one-batch prefetch only for sized loaders, which is what keeps the saved state in step with training;
* ``one_pass=True`` (evaluation): no shuffle, each record of the shard exactly once, the last pack flushed (a worker
  that found nothing usable yields one token-less batch carrying its skip counts), then
  the iterator ends (unsized).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from unigendet.inputs.skips import SkipCounter
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit, pack

log = logging.getLogger("unigendet.data")

# (record, generator, skips) -> plan(s), or None after counting the skip in ``skips``
Planner = Callable[[Any, torch.Generator, SkipCounter], "SamplePlan | dict[str, SamplePlan] | None"]

#####################################################################################################
# Token counting
#####################################################################################################


def plan_tokens(plan: SamplePlan, cfg: UniGenDetConfig) -> int:
    """Tokens the plan occupies in a packed sequence (markers included), without packing it."""
    n = 0
    for split in plan.splits:
        if isinstance(split, TextSplit):
            n += len(split.ids) + (1 if split.open else 2)
        elif isinstance(split, ViTSplit):
            p = cfg.vit.patch_size
            n += (split.image.shape[-2] // p) * (split.image.shape[-1] // p) + 2
        elif isinstance(split, VAESplit):
            if split.latent is not None:
                unit, (h, w) = cfg.flow.latent_patch_size, split.latent.shape[-2:]
            else:
                unit, (h, w) = cfg.vae_pixels_per_token, split.image.shape[-2:]
            n += (h // unit) * (w // unit) + 2
    return n


def record_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator for every random choice about one record in one record epoch."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{epoch}:{index}".encode()))


#####################################################################################################
# The stream
#####################################################################################################


class PackedStream(IterableDataset):
    def __init__(self, records: Sequence, planner: Planner, cfg: UniGenDetConfig, *, token_budget: int,
                 packs_per_epoch: int, max_sample_tokens: int | None = None, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, one_pass: bool = False) -> None:
        if token_budget < 1 or packs_per_epoch < 1:
            raise ValueError("token_budget and packs_per_epoch must be positive")
        if len(records) == 0:
            raise ValueError("the stream has no records")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.records, self.planner, self.cfg = records, planner, cfg
        self.token_budget = token_budget
        self.max_sample_tokens = min(max_sample_tokens or token_budget, token_budget)
        self.packs_per_epoch, self.seed, self.shuffle = packs_per_epoch, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.one_pass = one_pass
        if one_pass:
            self.shuffle = False
        self.skips = SkipCounter()
        self._progress: dict[int, dict[str, Any]] = {}  # worker -> state after the last pack trained on
        self._loaded = False  # a load_state_dict for the coming iteration (it wins over the recorded progress)
        self._state: dict[str, Any] = {"epoch": 0, "pos": 0, "pending": [], "yielded": 0}

    # ----------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self.one_pass:
            raise TypeError("a one-pass stream has no length known in advance")
        return self.packs_per_epoch

    def _worker(self) -> int:
        info = get_worker_info()
        return info.id if info is not None else 0

    def _shard(self) -> tuple[int, int, int]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * n_workers + worker, self.world_size * n_workers, n_workers

    def _quota(self, worker: int, n_workers: int) -> int:
        """Packs this worker yields per loader epoch; the workers' quotas sum to ``packs_per_epoch``."""
        base, extra = divmod(self.packs_per_epoch, n_workers)
        return base + (1 if worker < extra else 0)

    def shard_order(self, epoch: int, shard: int, n_shards: int) -> list[int]:
        n = len(self.records)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        else:
            order = torch.arange(n)
        return order[shard::n_shards].tolist()

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**{k: (list(v) if isinstance(v, list) else v) for k, v in self._state.items()},
                "skips": self.skips.state_dict(), "rank": self.rank, "world_size": self.world_size}

    def record(self, batch) -> None:
        """Note the worker state a pack (or ``{name: pack}``) was produced with: the pack has been trained on."""
        for b in batch.values() if isinstance(batch, dict) else [batch]:
            worker, state = b.stats["stream_state"]
            self._progress[worker] = state

    def progress(self) -> dict[int, dict[str, Any]]:
        return {w: dict(st) for w, st in self._progress.items()}

    def set_progress(self, progress: dict[int, dict[str, Any]]) -> None:
        self._progress = {int(w): dict(st) for w, st in progress.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off. A state written for another world size (a run resumed on
        more or fewer processes) cannot say which records this shard has seen: the stream then restarts the saved
        record epoch from its beginning (logged); the samples of that epoch seen before are seen again."""
        if state.get("world_size", self.world_size) != self.world_size:
            log.warning("data stream state from %s processes resumed on %s: record epoch %d restarts from its start",
                        state.get("world_size"), self.world_size, state["epoch"])
            self._state = {"epoch": state["epoch"], "pos": 0, "pending": [], "yielded": state["yielded"]}
            return
        if state.get("rank", self.rank) != self.rank:
            raise ValueError(f"stream state of rank {state.get('rank')}/{state.get('world_size')} cannot resume "
                             f"rank {self.rank}/{self.world_size} (each rank must load its own state)")
        self._state = {"epoch": state["epoch"], "pos": state["pos"],
                       "pending": [tuple(p) for p in state["pending"]], "yielded": state["yielded"]}
        self.skips.load_state_dict(state.get("skips", {}))
        self._loaded = True

    # ----------------------------------------------------------------------------------------------
    def _plan(self, epoch: int, index: int):
        record = self.records[index]
        plans = self.planner(record, record_generator(self.seed, epoch, index), self.skips)
        if plans is None:
            return None
        if isinstance(plans, SamplePlan):
            plans = {"": plans}
        return plans

    def __iter__(self) -> Iterator:
        if self.one_pass:
            yield from self._one_pass()
            return
        shard, n_shards, n_workers = self._shard()
        worker = shard - self.rank * n_workers
        quota = self._quota(worker, n_workers)
        if not self._loaded and worker in self._progress:  # a new loader epoch: continue where training is
            self.load_state_dict(self._progress[worker])
        self._loaded = False
        st = self._state
        if st["yielded"] >= quota:  # the previous loader epoch ended (a sized loader never asks past its length)
            st["yielded"] = 0
        order = self.shard_order(st["epoch"], shard, n_shards)
        cache: dict[tuple[int, int], tuple[dict, int]] = {}  # the overflow sample, already planned
        failed: set[int] = set()  # records skipped since the last usable one; all of the shard is an error, not a hang

        def next_candidate():
            """(epoch, index) of the next sample to place: first the overflow buffer, then the shard."""
            if st["pending"]:
                return st["pending"][0]
            nonlocal order
            while st["pos"] >= len(order):
                st["epoch"] += 1
                st["pos"] = 0
                order = self.shard_order(st["epoch"], shard, n_shards)
                if not order:
                    raise RuntimeError(f"shard {shard} of {n_shards} is empty: fewer records ({len(self.records)}) "
                                       "than ranks x workers")
            key = (st["epoch"], order[st["pos"]])
            st["pos"] += 1
            st["pending"].append(key)
            return key

        while st["yielded"] < quota:
            chosen: list[dict] = []
            keys: list[tuple[int, int]] = []
            tokens = 0
            while True:
                key = next_candidate()
                usable = cache.pop(key) if key in cache else self._usable(key)
                if usable is None:  # skipped and counted
                    st["pending"].pop(0)
                    self._fail(failed, key[1], len(order), shard)
                    continue
                plans, n = usable
                failed.clear()
                if chosen and tokens + n > self.token_budget:
                    cache[key] = (plans, n)  # overflow: it opens the next pack
                    break
                chosen.append(plans)
                keys.append(key)
                tokens += n
                st["pending"].pop(0)
                if tokens >= self.token_budget:
                    break
            st["yielded"] += 1
            yield self._collate(chosen, keys)

    def _one_pass(self) -> Iterator:
        shard, n_shards, _ = self._shard()
        chosen, keys, tokens, yielded = [], [], 0, 0
        for index in self.shard_order(0, shard, n_shards):
            key = (0, index)
            usable = self._usable(key)
            if usable is None:
                continue
            plans, n = usable
            if chosen and tokens + n > self.token_budget:
                yield self._collate(chosen, keys)
                yielded += 1
                chosen, keys, tokens = [], [], 0
            chosen.append(plans)
            keys.append(key)
            tokens += n
        if chosen:
            yield self._collate(chosen, keys)
        elif not yielded and self.skips.counts:  # nothing usable here: one token-less batch carries the skip counts
            yield self._collate([], [])

    def _usable(self, key: tuple[int, int]) -> tuple[dict, int] | None:
        """(plans, tokens) of a record, or None after counting why it cannot be used."""
        plans = self._plan(*key)
        if plans is None:  # the planner counted the skip
            return None
        n = plan_tokens(next(iter(plans.values())), self.cfg)
        if n > self.max_sample_tokens:
            self.skips.skip("too_many_tokens", self._record_id(key), f"{n} > {self.max_sample_tokens}")
            return None
        return plans, n

    def _fail(self, failed: set[int], index: int, shard_size: int, shard: int) -> None:
        """Count record ``index`` as unusable; when every record of the shard has failed since the last usable
        one, stop (distinct records: a streak may span a reshuffled record epoch and meet a record twice)."""
        failed.add(index)
        if len(failed) >= shard_size:
            raise RuntimeError(f"no usable sample in a whole pass over shard {shard} ({shard_size} records): every "
                               f"record was skipped ({dict(self.skips.counts)}, e.g. {dict(self.skips.examples)}); "
                               "check the image root and the token budget")

    def _record_id(self, key) -> str:
        record = self.records[key[1]]
        return str(getattr(record, "id", key[1]))

    def _collate(self, chosen: list[dict], keys: list[tuple[int, int]]):
        names = list(chosen[0]) if chosen else [""]
        batches = {name: pack([c[name] for c in chosen], self.cfg, allow_empty=True) for name in names}
        for b in batches.values():
            # records: (record epoch, record index) of each sample; skipped: this worker's running skip counts
            b.stats = {"skipped": dict(self.skips.counts), "samples": len(chosen), "records": list(keys),
                       "shard": self._shard()[0], "stream_state": (self._worker(), self.state_dict())}
        return batches[""] if names == [""] else batches
