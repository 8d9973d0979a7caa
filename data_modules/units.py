"""What a :class:`~data_modules.stream.PackedStream` permutes and reads: *units*, each holding one or more samples.

* :class:`RecordUnits`: an in-memory corpus (FakeClue JSON, metadata files, Parquet / Arrow rows); a unit is one
  record, its only sample sits at cursor 0;
* :class:`TarUnits`: WebDataset / img2dataset tar shards; a unit is one tar file read
  front to back, a sample's cursor is the byte offset of its first member (so a resumed stream seeks straight to it).

A units object is picklable (it travels to the DataLoader workers) and its ``read`` opens what it needs lazily.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from unigendet.inputs.skips import SkipCounter
from unigendet.inputs.tar_shards import TarSample, count_samples, iter_samples, sample_at


class Units(Protocol):
    single: bool  # every unit holds exactly one sample (records keys are then (epoch, unit))

    def __len__(self) -> int: ...

    def read(self, unit: int, cursor: int, skips: SkipCounter) -> Iterator[tuple[int, int, Any]]:
        """``(cursor, next cursor, record)`` of the unit's samples from ``cursor`` on; a damaged sample or a damaged
        rest of the unit is counted in ``skips``."""

    def read_one(self, unit: int, cursor: int, skips: SkipCounter) -> Any | None:
        """The record at ``cursor`` (a sample read before, e.g. pending when the run was checkpointed), or None."""

    def probe(self, n: int) -> list:
        """About the first ``n`` records (for estimating packs per epoch)."""

    def samples(self) -> int:
        """The number of samples, or an estimate."""


class RecordUnits:
    single = True

    def __init__(self, records: Sequence) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def read(self, unit: int, cursor: int, skips: SkipCounter) -> Iterator[tuple[int, int, Any]]:
        if cursor == 0:
            yield 0, 1, self.records[unit]

    def read_one(self, unit: int, cursor: int, skips: SkipCounter) -> Any:
        return self.records[unit]

    def probe(self, n: int) -> list:
        return list(self.records[:n])

    def samples(self) -> int:
        return len(self.records)


class TarUnits:
    """WebDataset / img2dataset tar shards: a unit is one shard, a sample's cursor is its first header's offset."""

    single = False

    def __init__(self, shards: Sequence[str], to_record: Callable[[TarSample, SkipCounter], Any]) -> None:
        self.shards, self.to_record = list(shards), to_record

    def __len__(self) -> int:
        return len(self.shards)

    def read(self, unit: int, cursor: int, skips: SkipCounter) -> Iterator[tuple[int, int, Any]]:
        for sample in iter_samples(self.shards[unit], skips, cursor):
            yield sample.offset, sample.next_offset, self.to_record(sample, skips)

    def read_one(self, unit: int, cursor: int, skips: SkipCounter) -> Any | None:
        sample = sample_at(self.shards[unit], cursor, skips)
        return None if sample is None else self.to_record(sample, skips)

    def probe(self, n: int) -> list:
        out: list = []
        skips = SkipCounter()
        for shard in self.shards[:4]:
            for sample in iter_samples(shard, skips):
                rec = self.to_record(sample, skips)
                if rec is not None:
                    out.append(rec)
                if len(out) >= n:
                    return out
        return out

    def samples(self) -> int:
        """img2dataset's ``<shard>_stats.json`` counts ("successes") when present, else the first shard's samples
        times the number of shards."""
        total = 0
        for shard in self.shards:
            stats = Path(shard).with_name(Path(shard).stem + "_stats.json")
            try:
                total += int(json.loads(stats.read_text())["successes"])
            except (OSError, ValueError, KeyError, TypeError):
                return count_samples(self.shards[0]) * len(self.shards)
        return total
