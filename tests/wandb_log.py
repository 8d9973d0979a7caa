"""Reading an offline W&B run for tests: its transaction log (``run-<id>.wandb``), leveldb-log framing of
``wandb_internal_pb2.Record`` (wandb 0.31 has no Python reader of its own)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7  # ":W&B" + magic (2) + version (1); each chunk: crc32 (4), length (2), type (1)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: Path):
    buf = path.read_bytes()
    assert buf[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, pending = HEADER, b""
    while pos + 7 <= len(buf):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        if kind == 0 and n == 0:  # zero padding to the end of the block
            pos += left
            continue
        data = buf[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == FULL:
            yield data
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            yield pending + data
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def records(path: Path, timeout: float = 60.0):
    """The ``wandb_internal_pb2.Record`` objects of a run's transaction log, in order, once the log is complete:
    ``wandb.finish()`` can return before the W&B service has written the run's last records (under load a test
    then missed the final history row), so this waits until the closing ``exit`` record is there (at most
    ``timeout`` seconds, then returns what there is)."""
    import time

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout
    while True:
        recs, complete = [], False
        try:
            for data in iter_records(path):
                rec = wandb_internal_pb2.Record()
                rec.ParseFromString(data)
                recs.append(rec)
            complete = any(r.WhichOneof("record_type") == "exit" for r in recs)
        except Exception:  # a record still being written
            if time.monotonic() > deadline:
                raise
        if complete or time.monotonic() > deadline:
            yield from recs
            return
        time.sleep(0.2)


def read_run(path: Path) -> tuple[dict, list[dict]]:
    """(the run's config after every update, its history rows) from an offline run's transaction log."""
    config: dict = {}
    history: list[dict] = []
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            for item in items:
                set_nested(config, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
        elif kind == "history":
            row: dict = {}
            for item in rec.history.item:
                set_nested(row, [item.key] if item.key else list(item.nested_key), json.loads(item.value_json))
            history.append(row)
    return config, history


def set_nested(d: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        d = d.setdefault(key, {})
    d[keys[-1]] = value
