"""Checksums: every checkpoint and export this project writes is verified before it is loaded.

Features:
* a single-file checkpoint (``last.ckpt``, ``epoch=..-step=...ckpt``, ``hpc_ckpt_N.ckpt``, a distributed
  checkpoint's ``meta.pt``) is a zip archive in which torch stores a CRC-32 of every member;
  :func:`verify_file` reads every member and compares. A truncated file has no zip directory and fails at once;
  a file in torch's pre-1.6 format (not a zip) carries no checksums and is let through;
* folders (a distributed checkpoint's ``*.distcp`` shards + ``.metadata`` + ``meta.pt``, an exported model) carry
  ``SHA256SUMS`` in ``sha256sum``'s own format (``sha256sum -c SHA256SUMS`` checks one by hand), written by
  :func:`seal` after every file is complete; :func:`verify_folder` checks that every listed file is there, then
  their digests, which can be split across processes (``part=(rank, world)``);
* a folder without ``SHA256SUMS`` (a BAGEL release, anything written elsewhere) loads as before;
* damage is a :class:`~unigendet.checkpoint.errors.CheckpointError`, one line naming the file and what is wrong.
A verified file is remembered by (path, size, mtime), so one process does not verify it twice.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

from unigendet.checkpoint.atomic import atomic_path
from unigendet.checkpoint.errors import CheckpointError

SUMS = "SHA256SUMS"
_ZIP_MAGIC = b"PK\x03\x04"
_verified: set[tuple[str, int, int]] = set()


def _stamp(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


#####################################################################################################
# Single files: torch's zip CRC-32s
#####################################################################################################


def verify_file(path: str | os.PathLike) -> bool:
    """Check every member of a torch checkpoint file against its CRC-32. True when checked, False for a file that
    carries none (torch's legacy format, or written with CRCs switched off); raises :class:`CheckpointError`."""
    path = Path(path)
    key = _stamp(path)
    if key in _verified:
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    if head != _ZIP_MAGIC:
        if len(head) < 4 or key[1] < 64:
            raise CheckpointError(f"{path}: damaged or truncated: only {key[1]} bytes")
        return False
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
            if all(m.CRC == 0 for m in members if m.file_size):  # saved with compute_crc32 off: nothing to check
                return False
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: damaged or truncated, not a complete checkpoint file ({e})") from e
    if bad is not None:
        raise CheckpointError(f"{path}: damaged: its member {bad} fails its CRC-32 check")
    _verified.add(key)
    return True


#####################################################################################################
# Folders: SHA256SUMS
#####################################################################################################


def digest(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_sums(folder: str | os.PathLike) -> dict[str, str] | None:
    """{file name: sha256} from ``folder/SHA256SUMS``, or None when the folder has none."""
    path = Path(folder) / SUMS
    if not path.is_file():
        return None
    sums = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        hexdigest, sep, name = line.partition("  ")
        if not sep or len(hexdigest) != 64 or not name or "/" in name:
            raise CheckpointError(f"{path}: damaged: line {n} is not '<sha256>  <file name>'")
        sums[name] = hexdigest
    return sums


def seal(folder: str | os.PathLike, sums: dict[str, str] | Iterable[str], *, merge: bool = False) -> Path:
    """Write ``folder/SHA256SUMS`` (atomically) for ``sums``: {name: digest}, or names to digest here. ``merge``
    keeps the entries already there for other files."""
    folder = Path(folder)
    if not isinstance(sums, dict):
        sums = {name: digest(folder / name) for name in sums}
    if merge:
        sums = {**(read_sums(folder) or {}), **sums}
    with atomic_path(folder / SUMS, what="checksum file") as partial:
        partial.write_text("".join(f"{h}  {name}\n" for name, h in sorted(sums.items())))
    return folder / SUMS


def verify_folder(folder: str | os.PathLike, part: tuple[int, int] = (0, 1)) -> bool:
    """Check the files ``folder/SHA256SUMS`` lists (every ``world``-th of them from ``rank``, for ``part=(rank,
    world)``): True when checked, False when the folder has no SHA256SUMS; raises :class:`CheckpointError` naming the
    first damaged or missing file."""
    folder = Path(folder)
    sums = read_sums(folder)
    if sums is None:
        return False
    rank, world = part
    names = sorted(sums)
    for name in names:  # all of them, on every rank: a missing file is found without reading anything
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing (listed in {folder / SUMS})")
    for name in names[rank::world]:
        path = folder / name
        key = _stamp(path)
        if key in _verified:
            continue
        if digest(path) != sums[name]:
            raise CheckpointError(f"{path}: damaged: its SHA-256 differs from the one in {folder / SUMS}")
        _verified.add(key)
    return True


def verify(path: str | os.PathLike, part: tuple[int, int] = (0, 1)) -> bool:
    """:func:`verify_folder` for a folder, :func:`verify_file` for a file (on rank 0 of ``part`` only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return verify_folder(path, part)
    return verify_file(path) if part[0] == 0 else False
