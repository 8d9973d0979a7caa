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
    """../shared/spec/bagel_keys.txt; the calling test is skipped, with the reason, when it is absent (a user's
    machine, a clone outside the workspace)."""
    path = SHARED / "spec" / "bagel_keys.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (the BAGEL-7B-MoT key list ships in ../shared/spec, not with the project)")
    return path


@pytest.fixture(autouse=True)
def _no_leaked_wandb_service():
    """A W&B run started in this process leaves its service address in os.environ (WANDB_SERVICE): a later test's
    subprocess would inherit it and talk to that (finished) service instead of its own. Shut it down and forget it."""
    before = os.environ.get("WANDB_SERVICE")
    yield
    if os.environ.get("WANDB_SERVICE") != before:
        import wandb

        wandb.teardown()
        if before is None:
            os.environ.pop("WANDB_SERVICE", None)
        else:
            os.environ["WANDB_SERVICE"] = before


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def mixed_plans(cfg, seed: int = 0, with_latents: bool = False):
    """Detection (with and without the clean VAE split) + text-to-image samples of varied sizes."""
    from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit

    g = torch.Generator().manual_seed(seed)
    pv, pt = cfg.vit.patch_size, cfg.vae_pixels_per_token
    lat = cfg.flow.latent_patch_size

    def ids(n):
        return torch.randint(0, cfg.tokens.bos - 1, (n,), generator=g).tolist()

    def vae(h, w, noisy=False):
        if with_latents:
            return VAESplit(latent=torch.randn(cfg.vae.z_channels, h * lat, w * lat, generator=g), noisy=noisy)
        return VAESplit(image=torch.rand(3, h * pt, w * pt, generator=g) * 2 - 1, noisy=noisy)

    def vit(h, w):
        return ViTSplit(image=torch.rand(3, h * pv, w * pv, generator=g) * 2 - 1)

    return [
        SamplePlan([vae(2, 3), vit(3, 2), TextSplit(ids(4)), TextSplit(ids(6), loss=True)], label=0, sample_id="a"),
        SamplePlan([vit(2, 2), TextSplit(ids(3)), TextSplit(ids(5), loss=True)], label=1, sample_id="b"),
        SamplePlan([TextSplit(ids(5)), vae(2, 2, noisy=True)], sample_id="c"),
        SamplePlan([vae(3, 1), vit(1, 3), TextSplit(ids(2)), TextSplit(ids(3), loss=True)], label=1, sample_id="d"),
        SamplePlan([TextSplit(ids(3)), vae(1, 3, noisy=True)], sample_id="e"),
    ]


def config_diff(a, b) -> dict[str, tuple]:
    """{"component.field": (a's value, b's value)} for every field that differs, ``name`` excluded."""
    da, db = a.to_dict(), b.to_dict()
    out = {}
    for key in sorted((set(da) | set(db)) - {"name"}):
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.update({f"{key}.{f}": (va.get(f), vb.get(f)) for f in sorted(set(va) | set(vb))
                        if va.get(f) != vb.get(f)})
        elif va != vb:
            out[key] = (va, vb)
    return out


def fixture_params() -> list:
    """pytest params over the parity fixture folders; one skipped param with the reason when there are none."""
    dirs = parity_fixture_dirs()
    if not dirs:
        reason = "no parity fixtures: set UNIGENDET_PARITY_FIXTURES or provide ../shared/fixtures/parity_*"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-fixtures")]
    return [pytest.param(d, id=d.name) for d in dirs]
