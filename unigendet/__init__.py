"""unigendet: one Mixture-of-Transformers model that generates images and detects (and explains) fakes."""

from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {"UniGenDetConfig": "unigendet.model.config", "UniGenDet": "unigendet.model.unigendet"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'unigendet' has no attribute {name!r}")
