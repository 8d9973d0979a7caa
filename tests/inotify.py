"""Linux inotify through ctypes, for tests that must act the moment a file appears (a SIGKILL while a checkpoint
is being written: polling would miss a write that takes milliseconds)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
from pathlib import Path

IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (then len bytes of name)


class Inotify:
    def __init__(self) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._folders: dict[int, Path] = {}

    def watch(self, folder: str | os.PathLike) -> None:
        """Report the files and folders created directly in ``folder``."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(folder), IN_CREATE)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder} failed")
        self._folders[wd] = Path(folder)

    def created(self, timeout: float) -> list[Path]:
        """The paths created since the last call, waiting up to ``timeout`` seconds for the first."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data, out, i = os.read(self.fd, 1 << 16), [], 0
        while i < len(data):
            wd, _mask, _cookie, n = _EVENT.unpack_from(data, i)
            name = data[i + _EVENT.size:i + _EVENT.size + n].rstrip(b"\0")
            out.append(self._folders[wd] / os.fsdecode(name))
            i += _EVENT.size + n
        return out

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Inotify:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
