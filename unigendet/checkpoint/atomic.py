"""The one atomic file writer: a reader sees the old file or the new one, never a part.

:func:`atomic_path` writes ``.<name>.partial`` next to the target, fsyncs it, ``os.replace``s it onto the target and
fsyncs the folder; a failed write removes the partial file and raises an ``OSError`` naming the file. Used for
checkpoints (``ckpt_io``, ``strategy``), exported safetensors and json and tokenizer copies (``checkpoint``) and cached
Inception weights (``fidelity``). Imports neither torch nor lightning.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, what: str = "file", mode: int | None = None,
                per_process: bool = False) -> Iterator[Path]:
    """Write ``path`` all at once: the block writes the yielded ``.<name>.partial`` next to it; then the partial file
    is fsynced, given ``mode`` (if set), ``os.replace``d onto ``path`` and the folder fsynced.

    ``per_process``: the partial file's name carries the process id, for files that several processes may write at
    once (a shared cache); otherwise the next write overwrites the partial file a killed writer left.

    A failed write (disk full, quota, I/O error) removes the partial file and raises an ``OSError`` that names the
    ``what`` and ``path`` and says whether an earlier version there is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / (f".{path.name}.{os.getpid()}.partial" if per_process else f".{path.name}.partial")
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(partial, mode)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        partial.unlink(missing_ok=True)
        errno = getattr(e, "errno", None) or _errno_in(e)
        kept = f"the previous {what} there is unchanged" if path.exists() else f"no earlier {what} exists there"
        raise OSError(errno, f"could not write {what} {path} ({e}); {kept}") from e
    os.replace(partial, path)
    fsync_dir(path.parent)


def _errno_in(e: BaseException) -> int | None:
    import errno

    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
        if os.strerror(code) in text or errno.errorcode[code] in text:
            return code
    return None
