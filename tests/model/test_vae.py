"""Tests of unigendet.model.vae: FLUX AE parity with the reference fixture, real-size key names, pixel AE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED, fixture_params
from unigendet.model.config import VAEConfig
from unigendet.model.vae import FluxAutoencoder, PixelAutoencoder, build_autoencoder

SPEC_KEYS = SHARED / "spec" / "bagel_keys.txt"  # read by one test, skipped when absent
TOL = 1e-4
# the AutoEncoderParams fields of the fixture's vae_config.json, all of which VAEConfig has
_JSON_FIELDS = ("resolution", "in_channels", "downsample", "ch", "out_ch", "ch_mult", "num_res_blocks",
                "z_channels", "scale_factor", "shift_factor")


def _vae_config_from_json(path: Path) -> VAEConfig:
    raw = json.loads(path.read_text())
    return VAEConfig(kind="flux", **{k: raw[k] for k in _JSON_FIELDS})


#####################################################################################################
# FLUX AE
#####################################################################################################


@pytest.mark.parametrize("fixture_dir", fixture_params())
def test_flux_parity_with_reference(fixture_dir: Path) -> None:
    from safetensors.torch import load_file

    for name in ("vae_config.json", "ae.safetensors", "batch.safetensors", "expected.safetensors"):
        if not (fixture_dir / name).is_file():
            pytest.skip(f"{fixture_dir} has no {name}")
    ae = build_autoencoder(_vae_config_from_json(fixture_dir / "vae_config.json"))
    assert isinstance(ae, FluxAutoencoder)
    ae.load_state_dict(load_file(fixture_dir / "ae.safetensors"), strict=True)
    batch, expected = load_file(fixture_dir / "batch.safetensors"), load_file(fixture_dir / "expected.safetensors")

    n_checked = 0
    for i in range(2):
        if f"vae_images.{i}" not in batch:
            continue
        images, latents = batch[f"vae_images.{i}"].float(), batch[f"vae_decode_latents.{i}"].float()
        with torch.no_grad():
            mean, logvar = ae.encode_moments(images)
            got = {"vae_moments_mean": mean, "vae_moments_logvar": logvar, "vae_encode": ae.encode(images),
                   "vae_decode": ae.decode(latents)}
        for key, value in got.items():
            ref = expected[f"{key}.{i}"]
            assert value.shape == ref.shape, f"{key}.{i}: {tuple(value.shape)} vs {tuple(ref.shape)}"
            diff = (value - ref).abs().max().item()
            assert diff <= TOL, f"{key}.{i}: max abs diff {diff:.3e} > {TOL}"
            n_checked += 1
    assert n_checked == 8, f"expected 2 VAE test inputs in {fixture_dir}, checked {n_checked // 4}"


def test_flux_real_size_keys_match_spec() -> None:
    if not SPEC_KEYS.is_file():
        pytest.skip(f"key spec {SPEC_KEYS} is absent")
    spec = {}
    for line in SPEC_KEYS.read_text().splitlines():
        if line.startswith("vae."):
            name, shape = line.split("\t")[:2]
            spec[name.removeprefix("vae.")] = tuple(json.loads(shape))
    assert spec, "no vae. lines in the key spec"

    with torch.device("meta"):
        ae = build_autoencoder(VAEConfig(kind="flux"))  # the defaults are the real FLUX AE
    got = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert sorted(set(got) - set(spec)) == []
    assert sorted(set(spec) - set(got)) == []
    assert got == spec
    assert sum(p.numel() for p in ae.parameters()) == 83_819_683
    assert not any(p.requires_grad for p in ae.parameters())


def test_flux_shapes_and_meta_init() -> None:
    cfg = VAEConfig(kind="flux", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, downsample=2)
    with torch.device("meta"):
        ae = build_autoencoder(cfg)
    ae.to_empty(device="cpu")
    ae.init_weights()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        mean, logvar = ae.encode_moments(x)
        z = ae.encode(x)
        y = ae.decode(z)
    assert mean.shape == logvar.shape == z.shape == (2, 4, 8, 12)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and torch.isfinite(z).all()
    assert ae.z_channels == 4 and ae.downsample == 2


def test_flux_sampling_is_seeded_and_noisy() -> None:
    torch.manual_seed(0)
    cfg = VAEConfig(kind="flux", ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, downsample=2)
    ae = build_autoencoder(cfg)
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        z_mean = ae.encode(x)
        z_a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        z_b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
        z_c = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(2))
        mean, logvar = ae.encode_moments(x)
    torch.testing.assert_close(z_a, z_b, rtol=0, atol=0)
    assert (z_a - z_mean).abs().max() > 1e-3
    assert (z_a - z_c).abs().max() > 1e-3
    # the sample is mean + std * eps, eps drawn from the generator
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    expected = ae.cfg.scale_factor * (mean + torch.exp(0.5 * logvar) * eps - ae.cfg.shift_factor)
    torch.testing.assert_close(z_a, expected)


#####################################################################################################
# Pixel AE
#####################################################################################################


def test_pixel_round_trip_is_exact() -> None:
    cfg = VAEConfig(kind="pixel", downsample=4, z_channels=48, scale_factor=2.0, shift_factor=0.0)
    ae = build_autoencoder(cfg)
    assert isinstance(ae, PixelAutoencoder)
    assert list(ae.parameters()) == [] and ae.state_dict() == {}
    x = torch.rand(2, 3, 16, 8) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 48, 4, 2)
    assert torch.equal(ae.decode(z), x)
    # one latent pixel holds exactly its 4x4x3 pixel block, scaled
    assert torch.equal(z[0, :, 1, 0].sort().values, (2.0 * x[0, :, 4:8, 0:4]).flatten().sort().values)
    assert torch.equal(ae.encode(x, sample=True), z)
    mean, logvar = ae.encode_moments(x)
    assert torch.equal(2.0 * mean, z) and logvar.shape == mean.shape and (logvar < -10).all()
    ae.init_weights()  # no-op
    assert ae.z_channels == 48 and ae.downsample == 4


def test_pixel_rejects_bad_shapes_and_configs() -> None:
    with pytest.raises(ValueError, match="z_channels"):
        VAEConfig(kind="pixel", downsample=4, z_channels=16)
    ae = build_autoencoder(VAEConfig(kind="pixel", downsample=2, z_channels=12))
    with pytest.raises(ValueError, match="multiple"):
        ae.encode(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError):
        ae.decode(torch.zeros(1, 7, 2, 2))
