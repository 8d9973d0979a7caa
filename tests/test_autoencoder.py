"""The demo's small learned autoencoder: ``ConvAutoencoder``, ``unigendet train-ae`` and ``init_ae_from``."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch

from unigendet.model.config import UniGenDetConfig, VAEConfig
from unigendet.model.vae import ConvAutoencoder, PixelAutoencoder, build_autoencoder
from unigendet.training.autoencoder import load_autoencoder, psnr, save_autoencoder, train_autoencoder

CFG = UniGenDetConfig.from_name("demo").vae


def _smooth_images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Colour ramps with a soft blob, 32-48 px: easy for any decent autoencoder."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        h, w = (int(v) for v in g.choice([32, 40, 48], size=2))
        yy, xx = np.mgrid[0:h, 0:w] / 48.0
        c0, c1, c2 = g.uniform(-0.8, 0.8, (3, 3))
        cy, cx = g.uniform(0, 1, 2)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
        img = c0 + (c1 - c0) * (0.5 * yy + 0.5 * xx)[..., None] + (c2 - c0) * blob[..., None] * 0.5
        out.append(torch.from_numpy(np.clip(img, -1, 1).astype(np.float32)).permute(2, 0, 1))
    return out


def test_folding_the_normalisation_changes_the_latent_scale_not_the_reconstruction():
    ae = build_autoencoder(CFG)
    ae.init_weights()
    x = torch.rand(2, 3, 48, 40) * 2 - 1
    raw, before = ae.encode(x), ae.decode(ae.encode(x))
    mean, std = torch.randn(CFG.z_channels), torch.rand(CFG.z_channels) + 0.5
    ae.fold_normalisation(mean, std)
    assert torch.allclose(ae.encode(x), (raw - mean[:, None, None]) / std[:, None, None], atol=1e-5)
    assert torch.allclose(ae.decode(ae.encode(x)), before, atol=1e-5)
    with pytest.raises(ValueError, match=r"image size \(30, 32\) is not a multiple of downsample=4"):
        ae.encode(torch.zeros(1, 3, 30, 32))


def test_a_token_reaches_past_its_own_pixels_unlike_the_pixel_space_to_depth():
    """Changing one latent token changes pixels of its neighbours: the decoder blends tokens at their borders, where
    the space-to-depth map leaves each token's 8x8 pixels on their own (the hard-edged blocks of the demo's samples
    before the learned AE)."""
    conv = build_autoencoder(CFG)
    conv.init_weights()
    pixel = PixelAutoencoder(VAEConfig(kind="pixel", downsample=4, z_channels=48, scale_factor=1.0, shift_factor=0.0))
    for ae, spreads in ((conv, True), (pixel, False)):
        z = torch.randn(1, ae.z_channels, 6, 6)
        bumped = z.clone()
        bumped[:, :, 2:4, 2:4] += 1.0  # one token of 2x2 latent pixels = 8x8 image pixels (rows / columns 8..15)
        diff = (ae.decode(bumped) - ae.decode(z)).abs().sum(1)[0]  # (24, 24)
        outside = diff.clone()
        outside[8:16, 8:16] = 0
        assert diff[8:16, 8:16].max() > 0
        assert (outside.max() > 1e-4) == spreads


def test_training_reconstructs_and_leaves_normalised_latents():
    images, held_out = _smooth_images(64), _smooth_images(16, seed=1)
    untrained = build_autoencoder(CFG)
    untrained.init_weights()
    ae, report = train_autoencoder(CFG, images, steps=120, batch=8, lr=3e-3, held_out=held_out)
    assert isinstance(ae, ConvAutoencoder) and not any(p.requires_grad for p in ae.parameters())
    before = psnr(untrained, held_out)
    assert report["heldout_psnr"] > 22 and report["heldout_psnr"] > before + 5, (report, before)
    z = torch.cat([ae.encode(im[None])[0].flatten(1) for im in images], dim=1)  # sides are multiples of 4
    assert z.mean(1).abs().max() < 0.1 and (z.std(1) - 1).abs().max() < 0.1


def test_save_load_round_trip_and_a_file_for_another_shape_is_refused(tmp_path):
    ae, report = train_autoencoder(CFG, _smooth_images(8), steps=2, batch=4)
    path = tmp_path / "ae.safetensors"
    save_autoencoder(ae, path, report)
    fresh = build_autoencoder(CFG)
    assert load_autoencoder(fresh, path)["steps"] == 2
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(fresh.decode(fresh.encode(x)), ae.decode(ae.encode(x)))
    narrow = build_autoencoder(VAEConfig(kind="conv", downsample=4, z_channels=8, ch=32, scale_factor=1.0,
                                         shift_factor=0.0))
    with pytest.raises(ValueError, match="does not fit this model's autoencoder"):
        load_autoencoder(narrow, path)
    with pytest.raises(FileNotFoundError, match="unigendet train-ae"):
        load_autoencoder(fresh, tmp_path / "missing.safetensors")


def test_train_ae_command_and_init_ae_from(tmp_path):
    """As a user runs it: `unigendet train-ae` on the small demo corpus, then a model whose frozen AE is that file."""
    from tests.docs_workspace import environment
    from unigendet.demo.corpus import SMALL, build_demo_corpus
    from unigendet.training.module import LitUniGenDet

    corpus = tmp_path / "corpus"
    build_demo_corpus(corpus, seed=0, **SMALL)
    out = tmp_path / "ae.safetensors"
    (tmp_path / "home").mkdir()
    proc = subprocess.run(["unigendet", "train-ae", "--corpus", str(corpus), "--out", str(out), "--steps", "20"],
                          capture_output=True, text=True, timeout=300, env=environment(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["images"] > 0 and summary["heldout_psnr"] > 0 and out.is_file()
    lit = LitUniGenDet(model_name="demo", init_ae_from=str(out))
    lit.configure_model()
    expected = build_autoencoder(CFG)
    load_autoencoder(expected, out)
    for (name, p), q in zip(lit.model.vae.state_dict().items(), expected.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="no autoencoder file"):
        LitUniGenDet(model_name="demo", init_ae_from=str(tmp_path / "nothing.safetensors"))
