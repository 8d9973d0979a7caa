"""Record readers: FakeClue detection corpora and LAION-style text-to-image corpora -> typed records.

Records carry metadata only (paths, labels, text); pixels are decoded later, in the loader workers
(:func:`unigendet.inputs.images.open_image`).

Features:

* **Streaming, memory-light.** JSON Lines are read line by line; a JSON list (FakeClue's ``train.json``) is parsed
  element by element with :meth:`json.JSONDecoder.raw_decode` over a sliding buffer, so a 100k-record file never
  sits in memory as one Python list. Parquet captions are read in batches; image bytes are read later, one cell at a
  time (:func:`load_parquet_image_bytes`).
* **Every bad record is a counted skip, never an exception.** The reason (see ``skips.REASONS``) goes to the
  :class:`~unigendet.inputs.skips.SkipCounter`. The first failing check decides the reason, in this order:
  ``malformed_record`` (unparsable JSON line, non-object element, missing image path), ``bad_label``,
  ``empty_conversation`` / ``bad_conversation``, ``bad_text`` (not a string, or undecodable: invalid UTF-8 bytes or
  lone surrogates), ``text_too_long``, ``path_escapes_root``.
* **A JSON list cut off mid-file** (or corrupt from some point on) yields every record before the damage and counts
  the rest as ONE ``malformed_record`` (the number of lost records cannot be known).
* **Only an unreadable corpus raises**: a missing file (:class:`FileNotFoundError`) or a file that is not JSON /
  JSON Lines / Parquet, an empty file, a folder without ``*.parquet`` shards, or Parquet shards without the
  configured columns (:class:`CorpusError`).
* **Stable ids** ``"<file name>:<index>"``: the index counts the elements of a JSON list or the non-blank lines of a
  JSON Lines file (so the same content in either form gets the same ids), or the row within a Parquet shard.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unigendet.inputs.skips import SkipCounter

log = logging.getLogger("unigendet.data")


@dataclass(frozen=True)
class DetectionRecord:
    id: str  # stable and unique within the corpus (e.g. "train.json:17")
    image: str  # path relative to the image root, as written in the record
    label: int  # 0 = fake, 1 = real
    prompt: str  # the first human turn without the <image> tag
    answer: str  # the first gpt turn ("This is a fake image. ...")
    cate: str | None = None


@dataclass(frozen=True)
class T2IRecord:
    id: str
    prompt: str
    image: str | None = None  # metadata corpora: path relative to the metadata file's folder
    shard: str | None = None  # parquet corpora: shard file and row
    row: int | None = None


class CorpusError(ValueError):
    """The corpus as a whole cannot be read (wrong format, empty, missing columns); single bad records never raise."""


#####################################################################################################
# Limits and vocabulary
#####################################################################################################

MAX_TEXT_CHARS = 16_384  # detection prompt / answer
MAX_CAPTION_CHARS = 4_096  # T2I caption (LAION captions are a few hundred characters)
_CHUNK_CHARS = 1 << 20  # JSON list read size
_MAX_ELEMENT_CHARS = 64 << 20  # one JSON list element larger than this is treated as corrupt
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
_IMAGE_TAG = "<image>"
_PARQUET_MAGIC = b"PAR1"


#####################################################################################################
# Streaming JSON / JSON Lines
#####################################################################################################


@dataclass(frozen=True)
class _Malformed:
    detail: str


def _first_bytes(path: Path) -> bytes:
    """The first non-whitespace bytes of ``path`` (after a UTF-8 BOM), or b"" for an empty file."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:]
        while head and not head.strip():
            head = f.read(4096)
    return head.lstrip()


def _check_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return path


def _json_kind(path: Path) -> str:
    """``"list"`` or ``"lines"``; raises :class:`CorpusError` for anything else."""
    if path.is_dir():
        raise CorpusError(f"{path} is a folder, expected a JSON / JSON Lines file")
    head = _first_bytes(path)
    if not head:
        raise CorpusError(f"{path} is empty")
    if head.startswith(_PARQUET_MAGIC):
        raise CorpusError(f"{path} is a Parquet file, expected JSON / JSON Lines")
    if head[:1] == b"[":
        return "list"
    if head[:1] == b"{":
        return "lines"
    raise CorpusError(f"{path} is neither a JSON list nor JSON Lines (starts with {head[:16]!r})")


def _iter_json_list(f) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, element)`` of a top-level JSON list read from text stream ``f``, one element at a time.

    On damage (truncation, a syntax error, an element over ``_MAX_ELEMENT_CHARS``) yields one ``(index, _Malformed)``
    for the rest of the file and stops: a JSON list cannot be resynchronised reliably after a syntax error.
    """
    decoder = json.JSONDecoder()
    buf, pos, eof, want = "", 0, False, _CHUNK_CHARS

    def fill(n: int) -> None:
        nonlocal buf, pos, eof
        chunk = f.read(n)
        buf = buf[pos:] + chunk  # drop what was consumed
        pos = 0
        eof = not chunk

    def skip_ws() -> bool:
        """Advance past whitespace; False at end of input."""
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return True
            if eof:
                return False
            fill(_CHUNK_CHARS)

    fill(_CHUNK_CHARS)
    if buf.startswith("\ufeff"):
        pos = 1
    if not skip_ws() or buf[pos] != "[":
        yield 0, _Malformed("not a JSON list")
        return
    pos += 1
    if not skip_ws():
        yield 0, _Malformed("JSON list ends early (truncated file?)")
        return
    if buf[pos] == "]":
        pos += 1
        if skip_ws():
            yield 0, _Malformed(f"content after the JSON list's closing ']' ({buf[pos: pos + 16]!r}...) is not read")
        return
    index = 0
    while True:
        try:
            value, end = decoder.raw_decode(buf, pos)
            if end == len(buf) and not eof:  # a number or literal may continue in the next chunk
                raise json.JSONDecodeError("element touches the end of the buffer", buf, end)
        except json.JSONDecodeError as e:
            if not eof and len(buf) - pos < _MAX_ELEMENT_CHARS:
                fill(want)
                want = min(2 * want, _MAX_ELEMENT_CHARS)  # long elements: grow geometrically, not quadratically
                continue
            yield index, _Malformed(f"JSON list unreadable from element {index} on ({e.msg}); the rest is skipped")
            return
        want = _CHUNK_CHARS
        yield index, value
        index += 1
        pos = end
        if not skip_ws():
            yield index, _Malformed("JSON list ends early (truncated file?); the rest is skipped")
            return
        if buf[pos] == "]":
            pos += 1
            if skip_ws():  # something after the list: a second list, JSON Lines pasted after it, ...
                yield index, _Malformed(f"content after the JSON list's closing ']' ({buf[pos: pos + 16]!r}...) "
                                        "is not read")
            return
        if buf[pos] != ",":
            yield index, _Malformed(f"expected ',' or ']' after element {index - 1}, got {buf[pos]!r}")
            return
        pos += 1
        if not skip_ws():
            yield index, _Malformed("JSON list ends early (truncated file?); the rest is skipped")
            return


def _iter_json_lines(f) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, object | _Malformed)`` per non-blank line of binary stream ``f``."""
    index = 0
    for n, raw in enumerate(f):
        if n == 0 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        # undecodable bytes become lone surrogates: JSON structure still parses, the text check reports bad_text
        line = raw.decode("utf-8", errors="surrogateescape")
        try:
            yield index, json.loads(line)
        except json.JSONDecodeError as e:
            yield index, _Malformed(f"line {n + 1}: {e.msg}")
        index += 1


def iter_json_records(path: str | os.PathLike, skips: SkipCounter) -> Iterator[tuple[str, dict]]:
    """Stream ``(record id, object)`` from a JSON list or JSON Lines file; malformed elements are counted skips.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusError: the file is empty, not JSON / JSON Lines, or no line of a JSON Lines file parses.
    """
    path = _check_file(path)
    kind = _json_kind(path)
    n_ok = n_bad = 0
    if kind == "list":
        f = open(path, encoding="utf-8", errors="surrogateescape", newline="")
        elements: Iterable[tuple[int, Any]] = _iter_json_list(f)
    else:
        f = open(path, "rb")
        elements = _iter_json_lines(f)
    with f:
        for index, value in elements:
            rid = f"{path.name}:{index}"
            if isinstance(value, _Malformed):
                n_bad += 1
                skips.skip("malformed_record", rid, value.detail)
            elif not isinstance(value, dict):
                n_bad += 1
                skips.skip("malformed_record", rid, f"a JSON {type(value).__name__}, expected an object")
            else:
                n_ok += 1
                yield rid, value
    if kind == "lines" and n_bad and not n_ok:
        raise CorpusError(f"{path}: no line is a JSON object; not a JSON Lines file")


#####################################################################################################
# Field checks (each returns a skip reason or None)
#####################################################################################################


def _undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: invalid UTF-8 bytes in the file, or "\ud800" escapes
        return True
    return False


def _text_reason(text: Any, max_chars: int) -> tuple[str, str] | None:
    if not isinstance(text, str):
        return "bad_text", f"text is a {type(text).__name__}"
    if _undecodable(text):
        return "bad_text", "text is not valid UTF-8"
    if len(text) > max_chars:
        return "text_too_long", f"{len(text)} characters > {max_chars}"
    return None


def _path_reason(image: Any) -> tuple[str, str] | None:
    if not isinstance(image, str) or not image.strip():
        return "malformed_record", "no image path"
    if "\x00" in image or _undecodable(image):
        return "bad_text", "image path is not valid text"
    if posixpath.isabs(image) or os.path.isabs(image) or (image[:1].isalpha() and image[1:3] in (":/", ":\\")):
        return "path_escapes_root", f"absolute image path {image!r}"
    norm = posixpath.normpath(image.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return "path_escapes_root", f"image path {image!r} leaves the root"
    return None


def strip_image_tag(text: str) -> str:
    """Remove FakeClue's ``<image>`` placeholder (and the newline around it) from a human turn."""
    return text.replace(_IMAGE_TAG + "\n", "").replace("\n" + _IMAGE_TAG, "").replace(_IMAGE_TAG, "").strip()


def _conversation(conv: Any, max_chars: int) -> tuple[str, str] | tuple[str, str, str]:
    """``("ok", prompt, answer)`` or ``(reason, detail)`` for a FakeClue ``conversations`` field."""
    if conv is None or conv == []:
        return "empty_conversation", "no conversation"
    if not isinstance(conv, list):
        return "bad_conversation", f"conversations is a {type(conv).__name__}"
    for turn in conv:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            return "bad_conversation", "a turn is not an object with a 'from' role"
    first = conv[0]["from"].lower()
    if first in _GPT:
        return "bad_conversation", "the first turn is the answer (gpt), not the question"
    if first not in _HUMAN:
        return "bad_conversation", f"unknown role {conv[0]['from']!r}"
    answer_turn = next((t for t in conv[1:] if t["from"].lower() in _GPT), None)
    if answer_turn is None:
        return "empty_conversation", "no gpt answer"
    for text in (conv[0].get("value"), answer_turn.get("value")):
        reason = _text_reason(text, max_chars)
        if reason:
            return reason
    prompt, answer = strip_image_tag(conv[0]["value"]), answer_turn["value"].strip()
    if not answer:
        return "empty_conversation", "empty gpt answer"
    return "ok", prompt, answer


#####################################################################################################
# Detection corpora (FakeClue)
#####################################################################################################


def read_detection(path: str | os.PathLike, skips: SkipCounter, *, image_root: str | os.PathLike | None = None,
                   categories: Iterable[str] | None = None, prompt_override: str | None = None,
                   max_text_chars: int = MAX_TEXT_CHARS) -> Iterator[DetectionRecord]:
    """Stream the records of a FakeClue detection corpus (a JSON list or JSON Lines file).

    Args:
        path: the JSON / JSONL file.
        skips: receives one counted skip per bad record.
        image_root: unused by the reader (records keep the relative path); accepted so callers can pass one set of
            corpus options. Images are resolved under it by :func:`unigendet.inputs.images.open_image`.
        categories: keep only records whose ``cate`` is in this set (records filtered out are not skips).
        prompt_override: replaces every record's prompt (the human turn), e.g. a fixed forensic question.
        max_text_chars: a prompt or answer longer than this is a ``text_too_long`` skip.

    Yields:
        One :class:`DetectionRecord` per valid record, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusError: the file is not a JSON list / JSON Lines file at all.
    """
    del image_root
    keep = None if categories is None else set(categories)
    for rid, rec in iter_json_records(path, skips):
        if keep is not None and rec.get("cate") not in keep:
            continue
        label = rec.get("label")
        if type(label) is not int or label not in (0, 1):  # bools, strings, floats, 2, null are all bad
            skips.skip("bad_label", rid, f"label {label!r}")
            continue
        conv = _conversation(rec.get("conversations"), max_text_chars)
        if conv[0] != "ok":
            skips.skip(conv[0], rid, conv[1])
            continue
        _, prompt, answer = conv
        if prompt_override is not None:
            prompt = prompt_override
        elif not prompt:
            skips.skip("empty_conversation", rid, "empty human turn")
            continue
        image = rec.get("image")
        reason = _path_reason(image)
        if reason:
            skips.skip(reason[0], rid, reason[1])
            continue
        cate = rec.get("cate")
        yield DetectionRecord(id=rid, image=image, label=label, prompt=prompt, answer=answer,
                              cate=cate if isinstance(cate, str) else None)


#####################################################################################################
# Text-to-image corpora (metadata JSON/JSONL or Parquet shards)
#####################################################################################################


def t2i_image_root(path: str | os.PathLike) -> Path:
    """The folder that a metadata corpus's ``image_path`` entries are relative to (the metadata file's folder)."""
    return Path(path).parent


def _is_parquet(path: Path) -> bool:
    if path.suffix == ".parquet":
        return True
    with open(path, "rb") as f:
        return f.read(4) == _PARQUET_MAGIC


def _caption_reason(caption: Any, max_chars: int) -> tuple[str, str] | None:
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        return "bad_text", "empty caption"
    return _text_reason(caption, max_chars)


def read_t2i(path: str | os.PathLike, skips: SkipCounter, *, image_column: str = "image",
             caption_column: str = "caption", max_caption_chars: int = MAX_CAPTION_CHARS) -> Iterator[T2IRecord]:
    """Stream the records of a text-to-image corpus.

    Three layouts: a metadata JSON list / JSON Lines file of ``{"image_path": ..., "prompt": ...}`` (paths relative to
    the file's folder, see :func:`t2i_image_root`), one Parquet file, or a folder of Parquet shards (``*.parquet``,
    sorted by name). Parquet records hold ``shard`` and ``row`` only: the image bytes are read later with
    :func:`load_parquet_image_bytes`, so reading the corpus touches nothing but the caption column.

    Args:
        path: metadata file, Parquet file or folder of Parquet shards.
        skips: receives one counted skip per bad record.
        image_column: Parquet column with the image (raw bytes or a ``{"bytes": ...}`` struct, as LAION/HF write).
        caption_column: Parquet column with the caption.
        max_caption_chars: a longer caption is a ``text_too_long`` skip.

    Yields:
        One :class:`T2IRecord` per valid record.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusError: not JSON / JSON Lines / Parquet, no shards in the folder, or a shard lacks a configured column.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise CorpusError(f"{path} holds no *.parquet shards")
        yield from _read_parquet_shards(shards, skips, image_column, caption_column, max_caption_chars,
                                        lenient=len(shards) > 1)
    elif _is_parquet(path):
        yield from _read_parquet_shards([path], skips, image_column, caption_column, max_caption_chars, lenient=False)
    else:
        for rid, rec in iter_json_records(path, skips):
            prompt = rec.get("prompt")
            reason = _caption_reason(prompt, max_caption_chars) or _path_reason(rec.get("image_path"))
            if reason:
                skips.skip(reason[0], rid, reason[1])
                continue
            yield T2IRecord(id=rid, prompt=prompt, image=rec["image_path"])


def open_t2i_images(path: str | os.PathLike, skips: SkipCounter) -> list[tuple[str, Any]]:
    """(prompt, RGB ``PIL.Image``) of every record of a text-to-image metadata file (:func:`read_t2i`) whose image
    decodes; bad records and unreadable images are counted in ``skips``. Small corpora only: every image is held."""
    from unigendet.inputs.images import open_image

    root = t2i_image_root(path)
    pairs = ((rec.prompt, open_image(rec.image, skips, rec.id, root=root)) for rec in read_t2i(path, skips))
    return [(prompt, img) for prompt, img in pairs if img is not None]


def _read_parquet_shards(shards: list[Path], skips: SkipCounter, image_column: str, caption_column: str,
                         max_chars: int, lenient: bool) -> Iterator[T2IRecord]:
    """Captions of each shard in row order; an unreadable shard of a multi-shard folder is one counted skip."""
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
                        reason = _caption_reason(caption, max_chars)
                        if reason:
                            skips.skip(reason[0], rid, reason[1])
                        else:
                            yield T2IRecord(id=rid, prompt=caption, shard=str(shard), row=row)
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


def load_parquet_image_bytes(shard: str | os.PathLike, row: int, image_column: str = "image") -> bytes | None:
    """The image bytes of one Parquet cell, or None when the cell is null, holds no bytes or cannot be read.

    The open file is cached per process (16 shards); only the row group holding ``row`` is touched, in small batches.
    Accepts raw binary cells and ``{"bytes": ..., "path": ...}`` structs (HF ``datasets`` / LAION style).

    A damaged data page is logged and gives None (then counted as ``unreadable_image`` by ``open_image``).

    Raises:
        IndexError: ``row`` is outside the shard.
        KeyError: the shard has no column ``image_column``.
    """
    import pyarrow as pa

    reader = _cell_reader(str(shard), os.getpid())
    if image_column not in reader.pf.schema_arrow.names:
        raise KeyError(f"{shard} has no column {image_column!r}")
    try:
        value = reader.read(row, image_column)
    except (pa.ArrowException, OSError) as e:  # a damaged page: this cell is lost, the stream goes on
        reader._cursor = None
        if not reader.warned:
            reader.warned = True
            log.warning("cannot read %s row %d column %r (%s); further damaged cells of this shard are not logged",
                        shard, row, image_column, e)
        return None
    if isinstance(value, dict):
        value = value.get("bytes")
    if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
        return bytes(value)
    return None
