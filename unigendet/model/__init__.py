"""The UniGenDet network. Names resolve lazily so that ``unigendet.model.config`` stays importable without torch."""

from __future__ import annotations

_EXPORTS = {
    "UniGenDetConfig": "unigendet.model.config",
    "UniGenDet": "unigendet.model.unigendet",
    "PackedBatch": "unigendet.model.packing",
    "pack": "unigendet.model.packing",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unigendet.model' has no attribute {name!r}")
