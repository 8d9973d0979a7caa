"""Streaming DataModules for UniGenDet: FakeClue detection corpora, LAION-style text-to-image corpora, both together.

Names resolve lazily so that importing one reader does not pull in Lightning.
"""

from __future__ import annotations

_EXPORTS = {
    "DetectionDataModule": "data_modules.detection",
    "T2IDataModule": "data_modules.t2i",
    "CoEvolutionDataModule": "data_modules.coevolution",
    "GenStream": "data_modules.coevolution",
    "PackedStream": "data_modules.stream",
    "SkipCounter": "unigendet.inputs.skips",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_modules' has no attribute {name!r}")
