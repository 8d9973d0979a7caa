"""Shared test helpers: fixture discovery, tiny configs, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def parity_fixture_dirs() -> list[Path]:
    """Folders from UNIGENDET_PARITY_FIXTURES (os.pathsep-separated) when set, else ../shared/fixtures/parity_*."""
    env = os.environ.get("UNIGENDET_PARITY_FIXTURES")
    if env:
        return [Path(p) for p in env.split(os.pathsep) if p]
    return sorted(p for p in (SHARED / "fixtures").glob("parity_*") if p.is_dir())


def bagel_keys_file() -> Path:
    return SHARED / "spec" / "bagel_keys.txt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
