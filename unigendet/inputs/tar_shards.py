"""WebDataset / img2dataset tar shards: listed by brace patterns, globs or folders, read member by member.

A shard is a plain tar file; a *sample* is a run of consecutive members sharing a key, the WebDataset convention:
``dir/000123.jpg`` + ``dir/000123.txt`` + ``dir/000123.json`` is the sample ``dir/000123`` with the fields
``jpg``, ``txt`` and ``json`` (the key ends at the first dot of the file name, the field is the rest, lowercased).
img2dataset writes exactly this (``00000.tar`` holding ``000000000.jpg/.txt/.json``).

Features:
* :func:`expand_shards`: ``laion/{00000..41455}.tar`` (numeric ranges keep their zero padding), ``{a,b}``
  alternatives, several braces, ``*`` globs, a folder (its ``*.tar``, sorted), a file, or several of these
  separated by ``::``; a listed shard that does not exist is a counted ``missing_file`` skip (img2dataset leaves
  gaps where a shard failed), none at all is an error;
* :func:`iter_samples` reads a shard from a byte offset with the standard library's ``tarfile`` (streamed, never
  unpacked to disk; members' data are read as they pass): each sample comes with the offset of its first header
  (its *cursor*) and the offset where the next sample starts, so a resumed stream seeks straight to it;
* damage is counted, never fatal: a shard cut off inside a member or without its end-of-archive blocks counts
  ``truncated_tar``; a header that does not parse (the rest of the shard is unreadable) counts ``corrupt_tar``;
  a member over ``max_member_bytes`` counts ``member_too_large``; the samples before the damage are kept;
* members that are not regular files (directories, links) and names without a field (no dot) are ignored, as
  WebDataset does;
* :func:`write_shard` writes one shard in that layout (tests, benchmarks, converting a corpus).

Why ``tarfile`` and not the ``webdataset`` package: its tar iterators read a stream (``r|``) and expose no member
offsets, so an exact mid-shard resume would re-read the shard from its start, and its shuffle buffer is not
checkpointable; the grouping convention it defines is small and implemented here.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unigendet.inputs.json_stream import CorpusError
from unigendet.inputs.skips import SkipCounter

BLOCK = 512
MAX_MEMBER_BYTES = 256 * 1024 * 1024
_KEY = re.compile(r"^((?:.*/)?[^./][^./]*)\.([^/]+)$")  # "dir/key.ext.more" -> ("dir/key", "ext.more")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass
class TarSample:
    shard: str  # the shard's path
    key: str  # "dir/000123"
    fields: dict[str, bytes]  # {"jpg": ..., "txt": ..., "json": ...}
    offset: int  # byte offset of the sample's first header (its cursor)
    next_offset: int  # where the next sample's first header is (or the archive's end)

    @property
    def id(self) -> str:
        return f"{Path(self.shard).name}:{self.key}"


#####################################################################################################
# Listing shards
#####################################################################################################


def expand_braces(pattern: str) -> list[str]:
    """``a{01..03}b`` -> ``a01b a02b a03b``; ``{x,y}`` -> ``x y``; several braces multiply (leftmost first)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = _RANGE.fullmatch("{" + body + "}")
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        options = body.split(",")
    return [s for opt in options for s in expand_braces(head + opt + tail)]


def is_tar_spec(spec: str | os.PathLike) -> bool:
    """Whether a corpus path names tar shards: a ``.tar`` file or pattern, or a folder holding ``*.tar``."""
    text = os.fspath(spec)
    if any(part.strip().endswith(".tar") for part in text.split("::")):
        return True
    path = Path(text)
    return path.is_dir() and any(path.glob("*.tar"))


def expand_shards(spec: str | os.PathLike, skips: SkipCounter) -> list[str]:
    """The shard files ``spec`` names, in order (see the module docstring); missing ones are counted skips.

    Raises:
        CorpusError: no shard of the pattern exists, or a folder holds no ``*.tar``.
    """
    shards: list[str] = []
    for part in os.fspath(spec).split("::"):
        part = os.path.expanduser(part.strip())
        if not part:
            continue
        if Path(part).is_dir():
            found = sorted(str(p) for p in Path(part).glob("*.tar"))
            if not found:
                raise CorpusError(f"{part} holds no *.tar shards")
            shards += found
            continue
        for name in expand_braces(part):
            if any(c in name for c in "*?["):
                shards += sorted(glob.glob(name))
            elif Path(name).is_file():
                shards.append(name)
            else:
                skips.skip("missing_file", Path(name).name, f"tar shard {name} does not exist")
    if not shards:
        raise CorpusError(f"no tar shard of {os.fspath(spec)!r} exists")
    return shards


#####################################################################################################
# Reading samples
#####################################################################################################


def _field(name: str) -> tuple[str, str] | None:
    m = _KEY.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def iter_samples(shard: str, skips: SkipCounter, offset: int = 0,
                 max_member_bytes: int = MAX_MEMBER_BYTES) -> Iterator[TarSample]:
    """The samples of ``shard`` from byte ``offset`` (a sample's cursor, or 0) on; damage is counted in ``skips``
    (see the module docstring) and ends the shard."""
    name = Path(shard).name
    try:
        f = open(shard, "rb")
    except OSError as e:
        skips.skip("missing_file", name, f"cannot open tar shard {shard}: {e}")
        return
    with f:
        f.seek(offset)
        try:
            tf = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError, ValueError, UnicodeError) as e:
            _damage(f, offset, name, skips, str(e))
            return
        key: str | None = None
        fields: dict[str, bytes] = {}
        start = offset
        while True:
            try:
                member = tf.next()
            except (tarfile.TarError, OSError, ValueError, UnicodeError) as e:
                skips.skip("corrupt_tar", name, f"unreadable header after byte {tf.offset}: {e}")
                return
            if member is None:
                if key is not None and fields:
                    yield TarSample(shard, key, fields, start, tf.offset)
                _damage(f, tf.offset, name, skips, None)
                return
            tf.members = []  # no index of the whole shard in memory
            parsed = _field(member.name)
            if parsed is None or not member.isreg():
                continue
            if parsed[0] != key:
                if key is not None and fields:
                    yield TarSample(shard, key, fields, start, member.offset)
                key, fields, start = parsed[0], {}, member.offset
            if member.size > max_member_bytes:
                skips.skip("member_too_large", f"{name}:{member.name}", f"{member.size} bytes > {max_member_bytes}")
                continue
            try:
                data = tf.extractfile(member).read()
            except (tarfile.ReadError, OSError) as e:
                skips.skip("truncated_tar", f"{name}:{member.name}", f"the shard ends inside this member: {e}")
                return
            if len(data) != member.size:
                skips.skip("truncated_tar", f"{name}:{member.name}", "the shard ends inside this member")
                return
            fields[parsed[1]] = data


def _damage(f, end: int, name: str, skips: SkipCounter, error: str | None) -> None:
    """After tarfile stopped at ``end``: a clean end-of-archive (zero blocks) is fine; anything else is counted."""
    f.seek(end)
    tail = f.read(2 * BLOCK)
    if tail and not tail.strip(b"\0"):
        return  # the end-of-archive blocks
    if not tail:
        skips.skip("truncated_tar", name, f"the shard ends at byte {end} without its end-of-archive blocks")
    else:
        skips.skip("corrupt_tar", name, f"unreadable tar header at byte {end}" + (f": {error}" if error else ""))


def sample_at(shard: str, offset: int, skips: SkipCounter) -> TarSample | None:
    """The sample whose first header is at ``offset`` (a pending sample of a checkpoint), or None."""
    return next(iter_samples(shard, skips, offset), None)


def count_samples(shard: str) -> int:
    """The number of samples of one shard (headers only: member data are skipped by seeking)."""
    n, key = 0, None
    with tarfile.open(shard, mode="r:") as tf:
        for member in tf:
            parsed = _field(member.name)
            if parsed is not None and member.isreg() and parsed[0] != key:
                n, key = n + 1, parsed[0]
    return n


def write_shard(path: str | os.PathLike, samples: list[tuple[str, dict[str, Any]]]) -> Path:
    """Write ``samples`` (key, {field: bytes or str}) as one tar shard of ``key.field`` members, in order (the layout
    img2dataset and ``webdataset.TarWriter`` write); str values are UTF-8 encoded."""
    path = Path(path)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, fields in samples:
            for field, value in fields.items():
                data = value.encode() if isinstance(value, str) else bytes(value)
                info = tarfile.TarInfo(f"{key}.{field}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path
