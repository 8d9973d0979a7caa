"""A resumable stream of token-budget packed batches.

Features:
* it reads *units* (:mod:`data_modules.units`): records of an in-memory corpus, or tar shards read front to back;
  a ``planner`` turns one record into a ``SamplePlan`` (decoding its image) or ``None`` (a counted skip), or into
  several named plans (``{"gen": student, "teacher": teacher}``), packed side by side;
* each pass over the units ("record epoch") uses a permutation seeded by (seed, epoch); the permutation is split
  disjointly over (rank, dataloader worker): shard k of K takes positions k, k+K, k+2K, ...; a shard reads
  ``interleave`` units at a time, one sample from each in turn (tar shards: samples of several shards mix);
* token-budget packing with an overflow buffer: a sample that does not fit waits for the next pack; a sample longer
  than ``max_sample_tokens`` (or the budget) is skipped and counted (``too_many_tokens``);
* every random choice of a sample (caption dropout, timesteps) comes from a generator seeded by (seed, epoch, unit,
  cursor), so a sample planned again after a resume is planned identically;
* exact mid-epoch resume: ``state_dict()`` (called inside each worker by torchdata's ``StatefulDataLoader``, the
  loader Lightning checkpoints) holds the record epoch, the position in the shard's work, the units being read and
  their cursors, the pending (overflow) samples, the packs yielded in the current loader epoch and the skip counts;
  ``load_state_dict`` continues with exactly the next samples;
* progress survives loader epochs: DataLoader workers are new processes every loader epoch, started from the
  main process's copy of the stream, so each pack carries its worker's state (``stats["stream_state"]``), the
  main process records the state of every pack it trains on (:meth:`record`), and the next loader epoch's
  workers start from it; :meth:`progress` / :meth:`set_progress` carry it through checkpoints (Lightning does
  not restore loader state for a checkpoint taken at the end of a loader epoch);
* another layout continues the same pass: progress from another number of ranks or workers (:meth:`reshard`)
  becomes a carry (:mod:`data_modules.reshard`): what is left of the unfinished epochs is split over the new
  shards, so no sample is trained twice and none is left out;
* ``__len__`` is the number of packs per loader epoch on this rank (each worker yields its share): Lightning skips
  its one-batch prefetch only for sized loaders, which is what keeps the saved state in step with training;
* ``one_pass=True`` (evaluation): no shuffle, each sample of the shard exactly once, the last pack flushed (a worker
  that found nothing usable yields one token-less batch carrying its skip counts), then the iterator ends (unsized).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_modules.reshard import Carry, initial_state, reshard, shard_work
from data_modules.units import RecordUnits, Units
from unigendet.inputs.skips import SkipCounter
from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit, pack

log = logging.getLogger("unigendet.data")

# (record, generator, skips) -> plan(s), or None after counting the skip in ``skips``
Planner = Callable[[Any, torch.Generator, SkipCounter], "SamplePlan | dict[str, SamplePlan] | None"]
Key = tuple[int, int, int]  # (record epoch, unit, cursor) of one sample

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


def record_generator(seed: int, epoch: int, index: int, cursor: int = 0) -> torch.Generator:
    """The generator for every random choice about one sample (unit ``index``, at ``cursor``) in one record epoch."""
    tag = f"{seed}:{epoch}:{index}" if cursor == 0 else f"{seed}:{epoch}:{index}@{cursor}"
    return torch.Generator().manual_seed(zlib.crc32(tag.encode()))


def _key(k: Sequence[int]) -> Key:
    return (int(k[0]), int(k[1]), int(k[2]) if len(k) > 2 else 0)  # (epoch, index): states written before units


#####################################################################################################
# The stream
#####################################################################################################


class PackedStream(IterableDataset):
    def __init__(self, records: Sequence | Units, planner: Planner, cfg: UniGenDetConfig, *, token_budget: int,
                 packs_per_epoch: int, max_sample_tokens: int | None = None, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, one_pass: bool = False, num_workers: int = 0,
                 interleave: int = 1) -> None:
        if token_budget < 1 or packs_per_epoch < 1 or interleave < 1:
            raise ValueError("token_budget, packs_per_epoch and interleave must be positive")
        units = records if hasattr(records, "read_one") else RecordUnits(records)
        if len(units) == 0:
            raise ValueError("the stream has no records")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.units, self.planner, self.cfg = units, planner, cfg
        self.token_budget = token_budget
        self.max_sample_tokens = min(max_sample_tokens or token_budget, token_budget)
        self.packs_per_epoch, self.seed, self.shuffle = packs_per_epoch, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.interleave = num_workers, interleave
        self.one_pass = one_pass
        if one_pass:
            self.shuffle = False
        self.skips = SkipCounter()
        self.carry: Carry | None = None  # what is left of unfinished epochs after a change of layout
        self._progress: dict[int, dict[str, Any]] = {}  # worker -> state after the last pack trained on
        self._loaded = False  # a load_state_dict for the coming iteration (it wins over the recorded progress)
        self._state: dict[str, Any] = initial_state(None)

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

    def n_shards(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def _quota(self, worker: int, n_workers: int) -> int:
        """Packs this worker yields per loader epoch; the workers' quotas sum to ``packs_per_epoch``."""
        base, extra = divmod(self.packs_per_epoch, n_workers)
        return base + (1 if worker < extra else 0)

    def epoch_order(self, epoch: int) -> list[int]:
        """The epoch's permutation of the units (the same on every rank and worker)."""
        n = len(self.units)
        if self.shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)).tolist()
        return list(range(n))

    def shard_order(self, epoch: int, shard: int, n_shards: int) -> list:
        """Shard ``shard`` of ``n_shards``'s work in ``epoch``: unit indices, and [unit, cursor, single] items of a
        carried epoch (see :mod:`data_modules.reshard`)."""
        return shard_work(self.epoch_order(epoch), epoch, shard, n_shards, self.carry)

    # ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        shard, n_shards, _ = self._shard()
        return {**{k: ([list(x) for x in v] if isinstance(v, list) else v) for k, v in self._state.items()},
                "skips": self.skips.state_dict(), "rank": self.rank, "world_size": self.world_size,
                "shard": shard, "n_shards": n_shards}

    def record(self, batch) -> None:
        """Note the worker state a pack (or ``{name: pack}``) was produced with: the pack has been trained on."""
        for b in batch.values() if isinstance(batch, dict) else [batch]:
            worker, state = b.stats["stream_state"]
            self._progress[worker] = state

    def progress(self) -> dict[str, Any]:
        """This rank's data progress: its layout, carry and the state of each worker after its last trained pack."""
        return {"world_size": self.world_size, "rank": self.rank, "num_workers": self.num_workers,
                "n_units": len(self.units), "carry": self.carry,
                "workers": {w: dict(st) for w, st in self._progress.items()}}

    def set_progress(self, progress: dict[str, Any]) -> None:
        """Progress of this rank from a checkpoint written by the same layout (same ranks, same workers)."""
        new_format = "workers" in progress  # else {worker: state}, as written before carries existed
        workers = progress["workers"] if new_format else progress
        self.carry = progress.get("carry") if new_format else None
        self._progress = {int(w): dict(st) for w, st in workers.items()}
        self._state = initial_state(self.carry)

    def reshard(self, ranks: Sequence[dict[str, Any] | None]) -> None:
        """Continue the pass that the progress of *every* rank of another layout was in (``ranks[r]``: rank r's
        :meth:`progress`); see :mod:`data_modules.reshard`."""
        sizes = {int(p["n_units"]) for p in ranks if p and "n_units" in p}
        if sizes and sizes != {len(self.units)}:
            log.warning("data stream: the checkpoint's pass was over %s units (records or tar shards), this data has "
                        "%d: the data changed, so the pass starts again", sorted(sizes), len(self.units))
            self.carry, self._progress, self._state = None, {}, initial_state(None)
            return
        states = []
        for prog in ranks:
            prog = prog or {}
            workers = {int(w): st for w, st in prog.get("workers", {}).items()}
            for w in range(max(int(prog.get("num_workers", 0)), 1)):
                st = workers.get(w)
                st = dict(st) if st else initial_state(prog.get("carry"))
                st["open"] = [list(_key(k)) for k in st.get("open", [])]
                st["pending"] = [list(_key(k)) for k in st.get("pending", [])]
                states.append(st)
        carries = [(p or {}).get("carry") for p in ranks]
        self.carry = reshard(states, carries[0] if carries else None, self.epoch_order, len(self.units),
                             self.n_shards())
        self._progress = {}
        self._state = initial_state(self.carry)
        log.info("data stream: progress of %d reader shards continues on %d; record epoch %d goes on where it was",
                 len(states), self.n_shards(), self._state["epoch"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off (a state of this rank, written by the same layout)."""
        if state.get("world_size", self.world_size) != self.world_size or state.get("rank", self.rank) != self.rank:
            raise ValueError(f"stream state of rank {state.get('rank')}/{state.get('world_size')} cannot resume "
                             f"rank {self.rank}/{self.world_size} (each rank loads its own state; another layout "
                             "goes through reshard)")
        self._state = {"epoch": state["epoch"], "pos": state["pos"],
                       "pending": [list(_key(p)) for p in state["pending"]],
                       "open": [list(_key(p)) for p in state.get("open", [])], "turn": state.get("turn", 0),
                       "yielded": state["yielded"]}
        self.skips.load_state_dict(state.get("skips", {}))
        self._loaded = True

    # ----------------------------------------------------------------------------------------------
    def _usable(self, key: Key, record: Any) -> tuple[dict, int] | None:
        """(plans, tokens) of a sample, or None after counting why it cannot be used."""
        if record is None:  # the reader counted the skip
            return None
        plans = self.planner(record, record_generator(self.seed, *key), self.skips)
        if plans is None:  # the planner counted the skip
            return None
        if isinstance(plans, SamplePlan):
            plans = {"": plans}
        n = plan_tokens(next(iter(plans.values())), self.cfg)
        if n > self.max_sample_tokens:
            rid = getattr(record, "id", f"{key[1]}@{key[2]}")
            self.skips.skip("too_many_tokens", str(rid), f"{n} > {self.max_sample_tokens}")
            return None
        return plans, n

    def __iter__(self) -> Iterator:
        if self.one_pass:
            yield from self._one_pass()
            return
        shard, n_shards, n_workers = self._shard()
        worker = shard - self.rank * n_workers
        quota = self._quota(worker, n_workers)
        if self.carry is not None and self.carry["n_shards"] != n_shards:
            raise RuntimeError(f"the stream's carry was made for {self.carry['n_shards']} reader shards, the loader "
                               f"has {n_shards} (rank x workers); set num_workers on the stream")
        if not self._loaded and worker in self._progress:  # a new loader epoch: continue where training is
            self.load_state_dict(self._progress[worker])
        self._loaded = False
        st = self._state
        if st["yielded"] >= quota:  # the previous loader epoch ended (a sized loader never asks past its length)
            st["yielded"] = 0
        plain_units = len(range(shard, len(self.units), n_shards))  # units of the shard in a plain epoch
        interleave = min(self.interleave, max(plain_units, 1))  # no more than the shard has: epochs stay apart
        work = self.shard_order(st["epoch"], shard, n_shards)
        cache: dict[Key, tuple[dict, int] | None] = {}  # samples read and planned, not yet placed
        live: dict[tuple[int, int], tuple[Iterator, int]] = {}  # (epoch, unit) -> (reader, its next cursor)
        fruitful: set[tuple[int, int]] = set()  # open units that gave a usable sample
        dead: set[int] = set()  # units finished without one since the last usable sample: all of them is an error

        def take() -> None:
            """Move the next work item of the shard into ``open`` (or ``pending``, a single sample)."""
            nonlocal work
            while st["pos"] >= len(work):
                st["epoch"] += 1
                st["pos"] = 0
                work = self.shard_order(st["epoch"], shard, n_shards)
                carried = self.carry is not None and st["epoch"] in self.carry["epochs"]
                if not work and not carried:
                    raise RuntimeError(f"shard {shard} of {n_shards} is empty: fewer units ({len(self.units)}) "
                                       "than ranks x workers")
            item = work[st["pos"]]
            st["pos"] += 1
            if isinstance(item, int):
                st["open"].append([st["epoch"], item, 0])
            elif item[2]:
                st["pending"].append([st["epoch"], item[0], item[1]])
            else:
                st["open"].append([st["epoch"], item[0], item[1]])

        def next_key() -> Key:
            """The next sample to place: first the overflow buffer, then one from the open units in turn."""
            while True:
                if st["pending"]:
                    return _key(st["pending"][0])
                if len(st["open"]) < interleave:
                    take()
                    continue
                slot = st["turn"] % len(st["open"])
                epoch, unit, cursor = st["open"][slot]
                reader, at = live.get((epoch, unit), (None, -1))
                if at != cursor:
                    reader = self.units.read(unit, cursor, self.skips)
                got = next(reader, None)
                if got is None:
                    live.pop((epoch, unit), None)
                    del st["open"][slot]
                    if (epoch, unit) in fruitful:
                        fruitful.discard((epoch, unit))
                    else:
                        dead.add(unit)
                        if len(dead) >= max(plain_units, 1):
                            self._no_samples(shard, len(dead))
                    continue
                at, nxt, record = got
                live[(epoch, unit)] = (reader, nxt)
                st["open"][slot][2] = nxt
                st["turn"] += 1
                key = (epoch, unit, at)
                st["pending"].append(list(key))
                cache[key] = self._usable(key, record)
                return key

        while st["yielded"] < quota:
            chosen: list[dict] = []
            keys: list[Key] = []
            tokens = 0
            while True:
                key = next_key()
                if key in cache:
                    usable = cache.pop(key)
                else:  # a pending sample of a restored state: read it again at its cursor
                    usable = self._usable(key, self.units.read_one(key[1], key[2], self.skips))
                if usable is None:  # skipped and counted
                    st["pending"].pop(0)
                    continue
                plans, n = usable
                dead.clear()
                fruitful.add(key[:2])
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

    def _no_samples(self, shard: int, touched: int) -> None:
        raise RuntimeError(f"no usable sample in a whole pass over shard {shard} ({touched} units): every sample was "
                           f"skipped ({dict(self.skips.counts)}, e.g. {dict(self.skips.examples)}); check the image "
                           "root and the token budget")

    def _one_pass(self) -> Iterator:
        shard, n_shards, _ = self._shard()
        chosen, keys, tokens, yielded = [], [], 0, 0
        for unit in self.shard_order(0, shard, n_shards):
            for at, _, record in self.units.read(unit, 0, self.skips):
                key = (0, unit, at)
                usable = self._usable(key, record)
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

    def _collate(self, chosen: list[dict], keys: list[Key]):
        names = list(chosen[0]) if chosen else [""]
        batches = {name: pack([c[name] for c in chosen], self.cfg, allow_empty=True) for name in names}
        # records: (record epoch, record index) of each sample, or (record epoch, tar shard, byte offset)
        records = [k[:2] for k in keys] if self.units.single else list(keys)
        for b in batches.values():
            # skipped: this worker's running skip counts
            b.stats = {"skipped": dict(self.skips.counts), "samples": len(chosen), "records": records,
                       "shard": self._shard()[0], "stream_state": (self._worker(), self.state_dict())}
        return batches[""] if names == [""] else batches
