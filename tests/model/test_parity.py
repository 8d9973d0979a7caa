"""Numerical parity with the authors' model on the reference fixtures (docs/method.md; the fixtures' README).

The fixture folders come from UNIGENDET_PARITY_FIXTURES (os.pathsep-separated) when set, else every
../shared/fixtures/parity_* folder. Each is loaded through the real checkpoint loader, its packed batch through
the reference-layout adapter, and every tensor of expected.safetensors and every scalar of expected.json must
match to 1e-4 (fp32, CPU), with both attention kernels.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import parity_fixture_dirs
from unigendet.checkpoint.loading import load_model
from unigendet.model.packing import from_reference_batch
from unigendet.model.unigendet import reduce_losses

TOL = 1e-4
FIXTURES = parity_fixture_dirs()
pytestmark = pytest.mark.skipif(not FIXTURES, reason="no parity fixture: set UNIGENDET_PARITY_FIXTURES or "
                                "provide ../shared/fixtures/parity_*")


def _ids(paths):
    return [Path(p).name for p in paths]


@pytest.fixture(scope="module", params=FIXTURES, ids=_ids(FIXTURES))
def fixture(request):
    folder = Path(request.param)
    model, report = load_model(folder)
    assert not report.missing and not report.unexpected, str(report)
    model.eval()
    tensors = load_file(folder / "batch.safetensors")
    meta = json.loads((folder / "batch.json").read_text())
    expected = load_file(folder / "expected.safetensors")
    scalars = json.loads((folder / "expected.json").read_text())
    bagel = json.loads((folder / "bagel_config.json").read_text())
    return model, tensors, meta, expected, scalars, bagel


def _hidden_layers(expected) -> dict[str, int]:
    return {k: int(m.group(1)) for k in expected if (m := re.fullmatch(r"hidden_after_layer(\d+)", k))}


def _outputs(model, batch, noise, expected, diga_layer):
    layers = _hidden_layers(expected)
    with torch.no_grad():
        out = model(batch, noise=noise, hidden_layers=tuple({*layers.values(), diga_layer}), return_hidden=True)
        ours = {
            "ce": out["ce"],
            "mse": out["mse"],
            "fake_predicted": out["det_logits"],
            "last_hidden_state": out["last_hidden"],
            "llm_input_embeds": out["embeds"],
            "diga_mlp_vae_tokens": model.project_diga(out["hidden"][diga_layer][batch.vae_indexes]),
            **{key: out["hidden"][layer] for key, layer in layers.items()},
        }
    return out, ours


@pytest.mark.parametrize("backend", ["sdpa", "flex_eager"])
def test_network_outputs_match_reference(fixture, backend):
    model, tensors, meta, expected, scalars, bagel = fixture
    model.attn_backend = backend
    batch = from_reference_batch(tensors, meta)
    diga_layer = bagel.get("diga_layer", model.cfg.head.diga_layer)
    out, ours = _outputs(model, batch, tensors["noise"], expected, diga_layer)
    network_keys = {k for k in expected if not k.startswith("vae_")}
    assert network_keys <= set(ours), f"fixture outputs this test does not compute: {network_keys - set(ours)}"
    assert {"ce", "mse", "fake_predicted", "last_hidden_state"} <= network_keys
    for key in sorted(network_keys):
        value, ref = ours[key], expected[key]
        assert value.shape == ref.shape, f"{key}: shape {tuple(value.shape)} != {tuple(ref.shape)}"
        diff = (value - ref).abs().max().item()
        assert diff <= TOL, f"{key}: max abs diff {diff:.3g} > {TOL}"

    losses = reduce_losses(out, batch)
    w = bagel.get("loss_weights", {"ce": 1.0, "mse": 1.0, "label": 0.2})
    total = w["ce"] * losses["loss_ce"] + w["mse"] * losses["loss_mse"] + w["label"] * losses["loss_det"]
    ref = scalars["losses"]
    for ours_key, ref_key in (("loss_ce", "ce"), ("loss_mse", "mse"), ("loss_det", "label_cross_entropy")):
        assert abs(losses[ours_key].item() - ref[ref_key]) <= TOL, (ours_key, losses[ours_key].item(), ref[ref_key])
    assert abs(total.item() - ref["total"]) <= TOL


def test_vae_outputs_match_reference(fixture):
    model, tensors, meta, expected, scalars, bagel = fixture
    vae = model.vae
    n = sum(1 for k in tensors if k.startswith("vae_images."))
    assert n > 0, "fixture has no VAE test images"
    vae_keys = {k for k in expected if k.startswith("vae_")}
    assert len(vae_keys) == 4 * n, f"unexpected VAE outputs in the fixture: {sorted(vae_keys)}"
    with torch.no_grad():
        for i in range(n):
            mean, logvar = vae.encode_moments(tensors[f"vae_images.{i}"])
            ours = {
                f"vae_moments_mean.{i}": mean,
                f"vae_moments_logvar.{i}": logvar,
                f"vae_encode.{i}": vae.encode(tensors[f"vae_images.{i}"], sample=False),
                f"vae_decode.{i}": vae.decode(tensors[f"vae_decode_latents.{i}"]),
            }
            for key, value in ours.items():
                diff = (value - expected[key]).abs().max().item()
                assert diff <= TOL, f"{key}: max abs diff {diff:.3g}"
