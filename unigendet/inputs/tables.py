"""Hugging Face datasets on disk and Parquet tables as corpora, read with ``pyarrow`` alone (no ``datasets``, no
network).

* a ``Dataset.save_to_disk`` folder (``state.json`` + ``dataset_info.json`` + ``data-0000k-of-0000n.arrow``, Arrow
  IPC streams) is memory-mapped; a ``DatasetDict`` folder (``dataset_dict.json``) is refused with the names of its
  split folders, which are what a split setting points at (``train: genimage/train``);
* Parquet files and folders of them (``Dataset.to_parquet`` exports, the Hub's ``refs/convert/parquet`` shards,
  LAION metadata with image bytes) are read in row batches;
* the features the ``datasets`` library wrote (``dataset_info.json``, or the ``huggingface`` key of a Parquet
  file's schema metadata) give a ``ClassLabel``'s names, so labels are read by name;
* records hold (file, row); the image cell is read later, in the loader workers (:func:`load_cell`): zero-copy from
  the memory-mapped Arrow file, or one row group batch of the Parquet file. An HF ``Image`` cell holding only a
  ``path`` (datasets saved without embedding their files) is read from that path.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unigendet.inputs.json_stream import CorpusError
from unigendet.inputs.skips import SkipCounter

HF_STATE, HF_INFO, HF_DICT = "state.json", "dataset_info.json", "dataset_dict.json"


def is_hf_saved(path: str | os.PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / HF_STATE).is_file() or (path / HF_DICT).is_file())


def is_table(path: str | os.PathLike) -> bool:
    """A saved HF dataset, a Parquet file or a folder of Parquet files."""
    path = Path(path)
    return is_hf_saved(path) or path.suffix == ".parquet" or (path.is_dir() and any(path.glob("*.parquet")))


def table_files(path: str | os.PathLike) -> list[Path]:
    """The Arrow files of a saved dataset, or the Parquet file(s); raises :class:`CorpusError` for anything else."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    if (path / HF_DICT).is_file():
        splits = json.loads((path / HF_DICT).read_text()).get("splits", [])
        raise CorpusError(f"{path} is a DatasetDict: point the split at one of its folders: "
                          + ", ".join(str(path / s) for s in splits))
    if (path / HF_STATE).is_file():
        state = json.loads((path / HF_STATE).read_text())
        files = [path / f["filename"] for f in state.get("_data_files", [])]
        if not files:
            raise CorpusError(f"{path / HF_STATE} lists no data files")
        return files
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise CorpusError(f"{path} holds no *.parquet files and is not a saved Hugging Face dataset")
        return files
    return [path]


def features(path: str | os.PathLike) -> dict[str, Any]:
    """The HF features of a saved dataset or a Parquet export ({} when none were written)."""
    path = Path(path)
    if (path / HF_INFO).is_file():
        return json.loads((path / HF_INFO).read_text()).get("features") or {}
    import pyarrow.parquet as pq

    meta = pq.read_schema(table_files(path)[0]).metadata or {}
    if b"huggingface" not in meta:
        return {}
    return (json.loads(meta[b"huggingface"]).get("info") or {}).get("features") or {}


def class_names(feats: dict[str, Any], column: str) -> list[str] | None:
    feat = feats.get(column) or {}
    return list(feat["names"]) if feat.get("_type") == "ClassLabel" and "names" in feat else None


#####################################################################################################
# Rows
#####################################################################################################


@functools.lru_cache(maxsize=32)
def _arrow_table(path: str, pid: int):
    del pid  # part of the key: a map opened before a DataLoader fork is not shared with the workers
    import pyarrow as pa

    return pa.ipc.open_stream(pa.memory_map(path, "r")).read_all()


def column_names(file: Path) -> list[str]:
    if file.suffix == ".arrow":
        return _arrow_table(str(file), os.getpid()).schema.names
    import pyarrow.parquet as pq

    return pq.read_schema(file).names


def iter_rows(files: list[Path], columns: list[str], skips: SkipCounter) -> Iterator[tuple[Path, int, dict]]:
    """``(file, row, {column: value})`` of every row; absent optional columns read as None. A Parquet row group
    that cannot be read loses its rows as counted ``malformed_record`` skips."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        names = column_names(file)
        present = [c for c in columns if c in names]
        if file.suffix == ".arrow":
            row = 0
            for batch in _arrow_table(str(file), os.getpid()).select(present).to_batches(max_chunksize=4096):
                yield from _batch_rows(file, batch, present, columns, row)
                row += batch.num_rows
            continue
        pf = pq.ParquetFile(file)
        row = 0
        for group in range(pf.metadata.num_row_groups):
            end = row + pf.metadata.row_group(group).num_rows
            try:
                for batch in pf.iter_batches(batch_size=4096, row_groups=[group], columns=present):
                    yield from _batch_rows(file, batch, present, columns, row)
                    row += batch.num_rows
            except (pa.ArrowException, OSError) as e:
                for lost in range(row, end):
                    skips.skip("malformed_record", f"{file.name}:{lost}", f"unreadable row group: {e}")
            row = end


def _batch_rows(file: Path, batch, present: list[str], columns: list[str], start: int):
    values = {c: batch.column(i).to_pylist() for i, c in enumerate(present)}
    for i in range(batch.num_rows):
        yield file, start + i, {c: (values[c][i] if c in values else None) for c in columns}


def load_cell(file: str | os.PathLike, row: int, column: str) -> Any:
    """One cell (a loader worker reads the image this way; a damaged Parquet page gives None, logged). Raises
    KeyError for an unknown column."""
    file = Path(file)
    if file.suffix == ".arrow":
        table = _arrow_table(str(file), os.getpid())
        if column not in table.schema.names:
            raise KeyError(f"{file} has no column {column!r}")
        return table.column(column)[row].as_py()
    from unigendet.inputs.parquet import load_parquet_cell

    return load_parquet_cell(file, row, column)


def image_value(cell: Any, base: Path) -> bytes | str | None:
    """An image cell as bytes, or as a path (an HF ``Image`` struct without bytes; relative to the dataset's
    folder ``base``), or None."""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return bytes(cell["bytes"])
        path = cell.get("path")
        return str(base / path) if isinstance(path, str) and path else None
    if isinstance(cell, (bytes, bytearray, memoryview)) and len(cell):
        return bytes(cell)
    return None
