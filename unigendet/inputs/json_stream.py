"""Streaming JSON lists and JSON Lines, record by record, with damage counted instead of raised.

A JSON list (FakeClue's ``train.json``) is parsed element by element with :meth:`json.JSONDecoder.raw_decode` over a
sliding buffer, so a 100k-record file never sits in memory as one Python list; JSON Lines are read line by line. A
list cut off mid-file (or corrupt from some point on) yields every element before the damage and counts the rest as
ONE ``malformed_record``; only an unreadable file (missing, empty, not JSON) raises.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unigendet.inputs.skips import SkipCounter

_CHUNK_CHARS = 1 << 20  # JSON list read size
_MAX_ELEMENT_CHARS = 64 << 20  # one JSON list element larger than this is treated as corrupt
PARQUET_MAGIC = b"PAR1"


class CorpusError(ValueError):
    """The corpus as a whole cannot be read (wrong format, empty, missing columns); single bad records never raise."""


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
    if head.startswith(PARQUET_MAGIC):
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
