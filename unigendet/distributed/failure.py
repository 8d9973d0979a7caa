"""When one rank fails, every rank ends within seconds, non-zero, and says which rank failed and why.

What stops the other ranks is torch.distributed itself, not a watchdog of ours:
* on gloo (CPU), a process that exits or is killed closes its connections, and every collective waiting on it
  fails at once ("Connection closed by peer");
* a distributed checkpoint (torch.distributed.checkpoint) gathers every rank's write errors and raises them on
  all ranks (``CheckpointException``), so a full disk on one rank stops every rank at the same save;
* on NCCL (GPUs) a dead peer is noticed only when a collective times out: the process-group ``timeout``
  (``--trainer.strategy.init_args.timeout``; torch's default is 10 minutes for NCCL) with torch's asynchronous
  error handling (``TORCH_NCCL_ASYNC_ERROR_HANDLING``, on by default) aborts the waiting ranks; under Slurm,
  ``srun --kill-on-bad-exit=1`` (the sbatch templates) ends every task as soon as one exits non-zero.

What this module adds is the message and a bounded exit (``unigendet fit`` prints :func:`report`'s line after the
traceback of any error in a multi-process run, then exits with code 1):
* :func:`register`: each rank records its host and pid in the process group's store at start;
* the failing rank writes ``<Type>: <message>`` into the store under its rank and prints
  ``unigendet fit: rank R failed: <Type>: <message>``;
* a rank stopped by the failure of another (a communication error, or a distributed checkpoint's exception naming
  other ranks) prints ``unigendet fit: rank R stopped: rank Q failed: <Q's report>``; a peer that left no report
  is named with its pid when its process is gone (killed: SIGKILL, the out-of-memory killer), and rank 0 when the
  store it hosts no longer answers;
* :func:`stop_launched_ranks`: rank 0 of a single-node run (Lightning starts ranks 1..N-1 as its children) stops
  the ranks it started, which on NCCL would otherwise wait for the collective timeout (Lightning does this itself
  only for Ctrl-C; when a child fails, its own observer ends the others within 5 seconds);
* :func:`exit_within` ends the process after a grace period even if an exit hook or a destructor waits on a dead
  peer.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import torch.distributed as dist

from unigendet.distributed.ranks import world

PREFIX = "unigendet/rank/"
# what torch's communication errors say when a peer is gone or silent
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "timed out", "Timed out",
             "NCCL communicator was aborted", "NCCL error", "Socket Timeout")


def _store() -> Any | None:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


_launched: list = []  # the rank processes this process started (Lightning's single-node launcher, on rank 0)


def register(strategy: Any = None) -> None:
    """Record this rank's host and pid in the process group's store (every rank, once the group exists), and the
    rank processes ``strategy``'s launcher started here."""
    store = _store()
    if store is not None:
        rank, _ = world()
        store.set(f"{PREFIX}{rank}/pid", f"{socket.gethostname()} {os.getpid()}")
    procs = getattr(getattr(strategy, "launcher", None), "procs", None)
    _launched[:] = list(procs or [])


def stop_launched_ranks(grace_s: float = 3.0) -> int:
    """SIGKILL the rank processes this process started that are still running after ``grace_s`` (time to print
    their own line; on NCCL they would wait for the collective timeout; Lightning's launcher does this only for
    Ctrl-C). Returns how many were stopped."""
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in _launched) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = [p for p in _launched if p.poll() is None]
    for p in alive:
        p.send_signal(signal.SIGKILL)
    return len(alive)


def describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:400]}{' ...' if len(text) > 400 else ''}"


def _chain(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def checkpoint_failures(error: BaseException) -> dict[int, str]:
    """{rank: its error} when ``error`` is (or was raised from) a distributed checkpoint's gathered failures."""
    from torch.distributed.checkpoint.api import CheckpointException

    for e in _chain(error):
        if isinstance(e, CheckpointException):
            return {int(rank): describe(exc[0] if isinstance(exc, tuple) else exc) for rank, exc in e.failures.items()}
    return {}


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` says that another rank went away or went silent (not that this rank failed)."""
    for e in _chain(error):
        if isinstance(e, (dist.DistNetworkError, dist.DistStoreError)):
            return True
        if any(s in str(e) for s in PEER_GONE):
            return True
    return False


def _process_state(pid: int) -> str | None:
    """'gone', 'zombie' (ended, not yet reaped), or None (running) for a pid on this host."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return "zombie" if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X") else None
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "gone"


def peers_report(rank: int, size: int, wait_s: float = 0.5) -> str:
    """What the other ranks left in the store: their failures, else which of them is gone. A failing rank writes its
    report before it exits, and its exit is what breaks this rank's collective, so a short wait suffices."""
    store = _store()
    if store is None:
        return "another rank went away"
    try:
        store.set_timeout(datetime.timedelta(seconds=2))
        deadline = time.monotonic() + wait_s
        while True:
            reports = {r: store.get(f"{PREFIX}{r}/failure").decode() for r in range(size)
                       if r != rank and store.check([f"{PREFIX}{r}/failure"])}
            if reports or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        if reports:
            return "; ".join(f"rank {r} failed: {text}" for r, text in sorted(reports.items()))
        host = socket.gethostname()
        gone = []
        for r in range(size):
            if r == rank or not store.check([f"{PREFIX}{r}/pid"]):
                continue
            peer_host, pid = store.get(f"{PREFIX}{r}/pid").decode().rsplit(" ", 1)
            if peer_host == host and _process_state(int(pid)):
                gone.append(f"rank {r} (pid {pid}) ended without a report: killed by a signal (SIGKILL, the "
                            "out-of-memory killer)")
        return "; ".join(gone) or "another rank ended or went silent without a report (on another host: see its log)"
    except (RuntimeError, OSError) as e:  # the store's server lives in rank 0's process
        if rank == 0:
            return f"another rank went away, and the store does not answer ({describe(e)})"
        return ("rank 0 is gone (the store it hosts does not answer): killed by a signal (SIGKILL, the "
                "out-of-memory killer) or its host failed")


def report(error: BaseException) -> str | None:
    """Which rank failed and why (see the module docstring), as one line to print; None outside a multi-process
    run. The failing rank's own cause goes into the store for the others."""
    rank, size = world()
    if size < 2:
        return None
    failures = checkpoint_failures(error)
    if failures and rank not in failures:
        line = f"rank {rank} stopped: " + "; ".join(f"rank {r} failed: {d}" for r, d in sorted(failures.items()))
    elif not failures and is_peer_failure(error):
        line = f"rank {rank} stopped: {peers_report(rank, size)}"
    else:
        cause = failures.get(rank) or describe(error)
        store = _store()
        try:
            if store is not None:
                store.set_timeout(datetime.timedelta(seconds=2))
                store.set(f"{PREFIX}{rank}/failure", cause)
        except (RuntimeError, OSError):
            pass  # the store's host (rank 0) is gone too; this rank's own line below still says it
        line = f"rank {rank} failed: {cause}"
    return line


def exit_within(seconds: float, code: int = 1) -> None:
    """End this process with ``code`` after ``seconds`` unless it has ended by then (exit hooks and destructors
    that wait on a dead peer must not keep a failed rank alive)."""
    def _end() -> None:
        time.sleep(seconds)
        sys.stderr.flush()
        os._exit(code)

    threading.Thread(target=_end, name="unigendet-exit", daemon=True).start()
