"""Shared machinery of the streaming DataModules.

* ``connect(cfg)`` fixes what only the model knows (patch sizes, latent grid, special tokens); the tokenizer is
  checked against it;
* loaders are torchdata ``StatefulDataLoader``s over :class:`PackedStream` (one item = one packed batch), so Lightning
  stores their position in its checkpoints and restores it on ``fit(ckpt_path=...)``;
* the rank and world size come from the trainer at ``setup`` (0 / 1 standalone);
* ``packs_per_epoch`` (packed batches per rank per loader epoch) defaults to an estimate from the first records;
* data progress per worker, recorded from the batches actually trained on (``record_train_batch``, called by
  the LightningModule), carried into the next loader epoch and through checkpoints (``train_progress`` /
  ``resume_train_progress``), see ``PackedStream``; a checkpoint of another layout (ranks x workers) continues its
  pass resharded over this one (:mod:`data_modules.reshard`);
* ``skip_metrics(batch)`` adds the skips found while reading the records to the running counts each loader
  worker attaches to its batches: the corpus-wide ``data/skipped/<reason>`` so far.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from data_modules.stream import PackedStream, plan_tokens, record_generator
from data_modules.units import RecordUnits, TarUnits
from unigendet.inputs.skips import SkipCounter
from unigendet.inputs.tar_shards import expand_shards, is_tar_spec
from unigendet.inputs.tokenizer import Tokenizer
from unigendet.inputs.transforms import ImageTransform, vae_transform, vit_transform
from unigendet.model.config import UniGenDetConfig

log = logging.getLogger("unigendet.data")

@dataclass(eq=False, repr=False)
class StreamDataModule(L.LightningDataModule):
    """The fields every streaming DataModule has. Subclasses are dataclasses too and implement ``records(split)``
    and ``planner(split)``."""

    train: str | None = None
    """Training split (format: see the subclass)."""
    val: str | None = None
    """Validation split; evaluated in one pass, in file order."""
    test: str | None = None
    """Test split; evaluated in one pass, in file order."""
    tokenizer: str | None = None
    """``tokenizer.json`` (or a folder holding it) whose special tokens match the model's; None: the model folder's
    (``model.init_from``), as ``connect`` is given it."""
    token_budget: int = 4096
    """Tokens per packed batch."""
    max_sample_tokens: int | None = None
    """Samples longer than this are skipped and counted (default: the budget)."""
    packs_per_epoch: int | None = None
    """Packed batches per rank per loader epoch (default: about one pass over the records)."""
    num_workers: int = 2
    """DataLoader worker processes; records are sharded over (rank, worker)."""
    seed: int = 0
    """Shuffling and per-record randomness."""
    interleave: int = 4
    """Tar shards each loader worker reads at once, one sample from each in turn (in-memory corpora: 1)."""
    replicate_across_ranks: bool = False
    """Every rank reads the whole stream (the same batches on every rank) instead of its own shard: only for checking
    a sharded run against a single-process one."""
    vit_min_side: int | None = None
    """Image side bounds for the ViT and the VAE (None: BAGEL's 224..980 / 512..1024, scaled to the preset)."""
    vit_max_side: int | None = None
    vae_min_side: int | None = None
    vae_max_side: int | None = None

    def __post_init__(self) -> None:
        super().__init__()
        self.cfg: UniGenDetConfig | None = None
        self.tok: Tokenizer | None = None
        self._records: dict[str, Sequence] = {}
        self.read_skips = SkipCounter()
        self._shard_skips: dict[tuple[str, int], dict[str, int]] = {}
        self._train_ds = None
        self._pending_progress = None
        self._pending_reshard = None

    # ----------------------------------------------------------------------------------------------
    def connect(self, cfg: UniGenDetConfig, tokenizer: str | None = None) -> StreamDataModule:
        """Fix what only the model knows. ``tokenizer``: the model's own (its folder), used when ``self.tokenizer``
        is unset."""
        path = self.tokenizer or tokenizer
        if path is None:
            raise ValueError(f"{type(self).__name__}: set data.tokenizer (a tokenizer.json or a folder holding one), "
                             "or start from a model folder that holds one (model.init_from)")
        tok = Tokenizer(path)
        tok.check_config(cfg)
        self.cfg, self.tok = cfg, tok
        return self

    def _require_connected(self) -> UniGenDetConfig:
        if self.cfg is None:
            raise RuntimeError(f"{type(self).__name__}.connect(model_config) must be called before use")
        return self.cfg

    def vit_tf(self) -> ImageTransform:
        return vit_transform(self._require_connected(), min_side=self.vit_min_side, max_side=self.vit_max_side)

    def vae_tf(self) -> ImageTransform:
        return vae_transform(self._require_connected(), min_side=self.vae_min_side, max_side=self.vae_max_side)

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer  # Lightning sets it on the DataModule (LightningModules have ``_trainer``)
        if trainer is None or self.replicate_across_ranks:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ----------------------------------------------------------------------------------------------
    def split_records(self, split: str) -> Sequence:
        if split not in self._records:
            self._records[split] = self.records(split)
        return self._records[split]

    def record_image(self, split: str, rec, skips: SkipCounter | None = None):
        """The decoded RGB image of one record of ``split`` (PIL), or None with the reason counted in ``skips``
        (default: ``read_skips``). Paths stay confined to the split's data root, as in training."""
        raise NotImplementedError(f"{type(self).__name__} does not define record_image")

    def units(self, split: str) -> RecordUnits | TarUnits:
        """What the training stream of ``split`` reads: its records, or (subclasses) its tar shards."""
        return RecordUnits(self.split_records(split))

    def estimate_packs(self, units, planner, budget: int, world: int, probe: int = 16) -> int:
        """Packs per rank for one pass over ``units`` (records or tar shards), from the token counts of the first
        ``probe`` samples."""
        counts = []
        skips = SkipCounter()
        for i, rec in enumerate(units.probe(probe)):
            plans = planner(rec, record_generator(self.seed, 0, i), skips)
            if plans is not None:
                plan = plans if not isinstance(plans, dict) else next(iter(plans.values()))
                counts.append(plan_tokens(plan, self.cfg))
        if not counts:
            raise ValueError(f"none of the first {probe} records could be planned: {skips.counts}")
        per_pack = max(1.0, budget / (sum(counts) / len(counts)))
        return max(1, math.ceil(units.samples() / world / per_pack))

    def stream(self, split: str, *, budget: int, packs_per_epoch: int | None, one_pass: bool = False) -> PackedStream:
        cfg = self._require_connected()
        units = RecordUnits(self.split_records(split)) if one_pass else self.units(split)
        planner = self.planner(split)
        rank, world = self._rank()
        if packs_per_epoch is None and not one_pass:
            packs_per_epoch = self.estimate_packs(units, planner, budget, world)
        return PackedStream(units, planner, cfg, token_budget=budget, packs_per_epoch=packs_per_epoch or 1,
                            max_sample_tokens=self.max_sample_tokens, seed=self.seed, rank=rank, world_size=world,
                            one_pass=one_pass, num_workers=self.num_workers,
                            interleave=1 if units.single else self.interleave)

    def tar_units(self, split: str, to_record) -> TarUnits | None:
        """The split's tar shards as stream units, or None when the split is not tar shards."""
        spec = {"train": self.train, "val": self.val, "test": self.test}[split]
        if spec is None or not is_tar_spec(spec):
            return None
        return TarUnits(expand_shards(spec, self.read_skips), to_record)

    def tar_records(self, split: str, to_record) -> list | None:
        """The records of a tar split in memory (val / test: every sample with its image; train: the first shard's,
        without images: the captions fresh fakes are drawn from), or None when the split is not tar shards."""
        units = self.tar_units(split, to_record)
        if units is None:
            return None
        shards = range(len(units)) if split != "train" else range(1)
        out = [rec for u in shards for _, _, rec in units.read(u, 0, self.read_skips) if rec is not None]
        return out if split != "train" else [dataclasses.replace(r, blob=None) for r in out]

    def _path(self, split: str) -> Path:
        path = {"train": self.train, "val": self.val, "test": self.test}[split]
        if path is None:
            raise ValueError(f"{type(self).__name__} has no {split} split configured")
        return Path(path)

    def train_dataloader(self):
        return self.loader(self._track(self.stream("train", budget=self.token_budget,
                                                   packs_per_epoch=self.packs_per_epoch)))

    def _track(self, dataset):
        """Remember the training dataset (progress is recorded into it) and give it a checkpoint's progress."""
        self._train_ds = dataset
        if self._pending_progress is not None:
            dataset.set_progress(self._pending_progress)
            self._pending_progress = None
        if self._pending_reshard is not None:
            dataset.reshard(self._pending_reshard)
            self._pending_reshard = None
        return dataset

    def record_train_batch(self, batch) -> None:
        """Call with every training batch once it is trained on (the LightningModule does)."""
        if self._train_ds is not None:
            self._train_ds.record(batch)

    def train_progress(self):
        return self._train_ds.progress() if self._train_ds is not None else None

    def set_train_progress(self, progress) -> None:
        """Progress from a checkpoint: applied to the training dataset now, or when it is built."""
        if progress is None:
            return
        if self._train_ds is not None:
            self._train_ds.set_progress(progress)
        else:
            self._pending_progress = progress

    def resume_train_progress(self, ranks: list) -> bool:
        """Progress from a checkpoint: ``ranks[r]`` is what rank r's :meth:`train_progress` saved. Written by this
        layout (ranks, loader workers), this rank takes its own and True is returned (the checkpoint's loader
        states apply too); written by another, the pass is resharded over this layout (False: drop the loader
        states)."""
        rank, world = self._rank()
        if all(p is None for p in ranks):  # the checkpoint saved no data positions
            return len(ranks) == world
        own = next((p for p in ranks if p is not None and _layout(p) == (rank, world, self.num_workers)), None)
        if own is None and len(ranks) == world and ranks[rank] is not None and _layout(ranks[rank]) is None:
            own = ranks[rank]  # written before layouts were saved: the same number of ranks is trusted
        if own is not None:
            self.set_train_progress(own)
            return True
        seen: dict[int, dict] = {}
        for p in ranks:  # one entry per old rank (replicated ranks all report rank 0 of 1)
            if p is not None and _layout(p) is not None:
                seen.setdefault(_layout(p)[0], p)
        if not seen:
            log.warning("the checkpoint's data progress does not say which layout wrote it: the training stream "
                        "starts its record epoch again")
            return False
        old = [seen[r] for r in sorted(seen)]
        if self._train_ds is not None:
            self._train_ds.reshard(old)
        else:
            self._pending_reshard = old
        return False

    def val_dataloader(self):
        return self.loader(self.stream("val", budget=self.token_budget, packs_per_epoch=None, one_pass=True))

    def test_dataloader(self):
        return self.loader(self.stream("test", budget=self.token_budget, packs_per_epoch=None, one_pass=True))

    def predict_dataloader(self):
        """The test split (else val), one pass, for ``predict``."""
        split = "test" if self.test is not None else "val"
        return self.loader(self.stream(split, budget=self.token_budget, packs_per_epoch=None, one_pass=True))

    def loader(self, dataset) -> StatefulDataLoader:
        # persistent workers break resume (torchdata/datasets reports); one item is already a packed batch
        # its own generator: a loader draws its workers' base seed when an epoch starts, which must not move the
        # global RNG (a resumed run sets the RNG after the loader has started, an uninterrupted one before)
        return StatefulDataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False,
                                  generator=torch.Generator().manual_seed(self.seed))

    def skip_metrics(self, batch) -> dict[str, int]:
        """``data/skipped/<reason>``: skips found reading the records plus the latest running counts of every
        (stream, shard) seen in batches so far. ``batch`` is a PackedBatch or a dict of them."""
        for name, b in (batch.items() if isinstance(batch, dict) else [("", batch)]):
            if "shard" in b.stats:
                self._shard_skips[(name, b.stats["shard"])] = dict(b.stats.get("skipped", {}))
        total = SkipCounter()
        total.merge(self.read_skips)
        for counts in self._shard_skips.values():
            total.counts.update(counts)
        return total.metrics()


def _layout(progress: dict) -> tuple[int, int, int] | None:
    """(rank, world size, loader workers) that wrote a stream's (or a zip of streams') progress; None if unknown."""
    if "workers" not in progress:
        inner = next((v for v in progress.values() if isinstance(v, dict) and "workers" in v), None)
        return None if inner is None else _layout(inner)
    if "num_workers" not in progress:
        return None
    return progress["rank"], progress["world_size"], progress["num_workers"]


def resolve(path: str | None, base: Path | None = None) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() or base is None else base / p


def balanced(records: Sequence, seed: int) -> list:
    """Oversample the minority label (deterministically) so both labels are equally frequent."""
    by_label: dict[int, list] = {}
    for r in records:
        by_label.setdefault(r.label, []).append(r)
    if len(by_label) < 2:
        return list(records)
    target = max(len(v) for v in by_label.values())
    g = torch.Generator().manual_seed(seed)
    out = []
    for label in sorted(by_label):
        group = by_label[label]
        extra = torch.randint(0, len(group), (target - len(group),), generator=g).tolist()
        out += group + [group[i] for i in extra]
    return out
