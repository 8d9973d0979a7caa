"""Parquet text-to-image shards: captions streamed in batches when the corpus is read, image bytes read later one
cell at a time (bounded memory, a cached reader per shard and process).

A damaged caption page loses the rest of its row group as counted ``malformed_record`` skips; an unreadable shard of
a multi-shard folder is one counted skip; a damaged image cell is logged once per shard and gives None.
"""

from __future__ import annotations

import bisect
import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from unigendet.inputs.json_stream import PARQUET_MAGIC, CorpusError
from unigendet.inputs.skips import SkipCounter

log = logging.getLogger("unigendet.data")


def is_parquet(path: Path) -> bool:
    if path.suffix == ".parquet":
        return True
    with open(path, "rb") as f:
        return f.read(4) == PARQUET_MAGIC


def iter_parquet_captions(shards: list[Path], skips: SkipCounter, image_column: str, caption_column: str,
                          reason: Callable[[Any], tuple[str, str] | None],
                          lenient: bool) -> Iterator[tuple[str, str, str, int]]:
    """``(record id, caption, shard, row)`` of each shard in row order; a caption for which ``reason`` returns
    ``(skip reason, detail)`` is a counted skip. ``lenient``: an unreadable shard is one counted skip (a folder of
    several shards) instead of a :class:`CorpusError`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_read = 0
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
        except (pa.ArrowException, OSError) as e:
            if not lenient:
                raise CorpusError(f"{shard} is not a readable Parquet file: {e}") from e
            skips.skip("malformed_record", f"{shard.name}", f"unreadable Parquet shard, all its rows skipped: {e}")
            continue
        names = pf.schema_arrow.names
        missing = [c for c in (caption_column, image_column) if c not in names]
        if missing:
            raise CorpusError(f"{shard} has no column(s) {missing}; its columns are {names} "
                              "(set the image / caption column names)")
        row = 0
        for group in range(pf.metadata.num_row_groups):
            end = row + pf.metadata.row_group(group).num_rows
            try:
                for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=[caption_column]):
                    for caption in batch.column(0).to_pylist():
                        rid = f"{shard.name}:{row}"
                        if isinstance(caption, bytes):  # a binary caption column
                            caption = caption.decode("utf-8", errors="surrogateescape")
                        why = reason(caption)
                        if why:
                            skips.skip(why[0], rid, why[1])
                        else:
                            yield rid, caption, str(shard), row
                        row += 1
            except (pa.ArrowException, OSError) as e:  # a damaged caption page: the rest of this row group is lost
                for lost in range(row, end):
                    skips.skip("malformed_record", f"{shard.name}:{lost}", f"unreadable caption page: {e}")
            row = end
        n_read += 1
    if not n_read:
        raise CorpusError(f"none of the {len(shards)} Parquet shards could be read")


class _ParquetCellReader:
    """Random access to single cells of one Parquet file with bounded memory.

    Reads go through the row group that holds the row, in batches of ``batch_rows`` with buffered column-chunk
    reads, and keep a cursor: consecutive rows (the common access pattern) cost one batch decode per ``batch_rows``
    rows; a jump backwards or to another row group restarts at the start of that row group. Shards written with small
    row groups (``row_group_size`` of a few hundred) make random access cheap.
    """

    def __init__(self, path: str, batch_rows: int = 64):
        import pyarrow.parquet as pq

        self.pf = pq.ParquetFile(path, buffer_size=1 << 20)
        meta = self.pf.metadata
        self.starts = [0]
        for i in range(meta.num_row_groups):
            self.starts.append(self.starts[-1] + meta.row_group(i).num_rows)
        self.batch_rows = batch_rows
        self._cursor: tuple | None = None  # (column, row group, batches iterator, batch, batch start row)
        self.warned = False  # a damaged page was logged

    def read(self, row: int, column: str) -> Any:
        if not 0 <= row < self.starts[-1]:
            raise IndexError(f"row {row} outside 0..{self.starts[-1] - 1}")
        group = bisect.bisect_right(self.starts, row) - 1
        cur = self._cursor
        if cur is None or cur[0] != column or cur[1] != group or row < cur[4]:
            batches = self.pf.iter_batches(batch_size=self.batch_rows, row_groups=[group], columns=[column])
            cur = (column, group, batches, None, self.starts[group])
        column_, group_, batches, batch, start = cur
        while batch is None or row >= start + batch.num_rows:
            if batch is not None:
                start += batch.num_rows
            batch = next(batches)
        self._cursor = (column_, group_, batches, batch, start)
        return batch.column(0)[row - start].as_py()


@functools.lru_cache(maxsize=16)
def _cell_reader(path: str, pid: int) -> _ParquetCellReader:
    del pid  # part of the key: a reader opened before a DataLoader fork is not shared with the workers
    return _ParquetCellReader(path)


def load_parquet_cell(shard: str | os.PathLike, row: int, column: str) -> Any:
    """One cell of a Parquet file (the open file is cached per process, 16 shards; only the row group holding ``row``
    is touched, in small batches). A damaged data page is logged once per shard and gives None.

    Raises:
        IndexError: ``row`` is outside the shard.
        KeyError: the shard has no column ``column``.
    """
    import pyarrow as pa

    reader = _cell_reader(str(shard), os.getpid())
    if column not in reader.pf.schema_arrow.names:
        raise KeyError(f"{shard} has no column {column!r}")
    try:
        return reader.read(row, column)
    except (pa.ArrowException, OSError) as e:  # a damaged page: this cell is lost, the stream goes on
        reader._cursor = None
        if not reader.warned:
            reader.warned = True
            log.warning("cannot read %s row %d column %r (%s); further damaged cells of this shard are not logged",
                        shard, row, column, e)
        return None

