"""FID/KID/IS with torch-fidelity, offline: the weights-file checks (pickled code refused, safetensors accepted), the
299-px preprocessing, the metrics against an independent computation from the Inception features, and the
GenerationQuality callback with a real Trainer and a real offline W&B run, read back from its transaction log.

The Inception weights are random (tests/inception_file.py), so the values mean nothing; the tests check that the
numbers are the ones the formulas give on those features."""

from __future__ import annotations

import json
import logging
import os
import shlex
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from callbacks.generation_quality import GenerationQuality
from tests.inception_file import inception_weights  # noqa: F401  (a fixture)
from tests.test_explanations_callback import offline_wandb  # noqa: F401  (a fixture)
from tests.test_lit_module import corpus, make, trainer  # noqa: F401  (corpus is a fixture)
from tests.wandb_log import read_run
from unigendet.evaluation.fidelity import (
    ENV_VAR,
    INCEPTION_FILE,
    InceptionWeightsMissing,
    fidelity_images,
    fidelity_metrics,
)
from unigendet.evaluation.fidelity import inception_weights as check_weights


def noise(n: int, seed: int, lo: int = 0, hi: int = 256, px: int = 64) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(lo, hi, (px, px, 3), dtype=np.uint8)) for _ in range(n)]


def smooth(n: int, seed: int, px: int = 64) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((px, px), Image.BILINEAR)
            for _ in range(n)]


@pytest.fixture(scope="module")
def extractor(inception_weights):  # noqa: F811
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(inception_weights))


def features(extractor, images) -> tuple[np.ndarray, np.ndarray]:
    """(pool features (N, 2048), unbiased logits (N, 1008)) in float64, on our own 299-px preprocessing."""
    with torch.no_grad():
        pool, logits = extractor(fidelity_images(images))
    return pool.double().numpy(), logits.double().numpy()


def frechet(x: np.ndarray, y: np.ndarray) -> float:
    """|mu_x - mu_y|^2 + tr(S_x + S_y - 2 sqrtm(S_x S_y)). With few samples S_x = A A^T (A: the centred features over
    sqrt(n - 1), 2048 x n), and the nonzero eigenvalues of S_x S_y are those of A^T S_y A (n x n, PSD), so
    tr sqrtm(S_x S_y) = tr sqrtm(A^T S_y A): scipy's sqrtm on an n x n matrix instead of 2048 x 2048."""
    a = (x - x.mean(0)).T / np.sqrt(len(x) - 1)
    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    cross = scipy.linalg.sqrtm(a.T @ sy @ a)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy) - 2 * np.trace(cross).real)


def kid_full(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with torch-fidelity's kernel (x.y / d + 1)^3 on whole sets: what every KID subset gives when the
    subset size is the set size (subsets are then permutations)."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda kk: kk.sum() - np.trace(kk)  # noqa: E731
    return float((off(kxx) + off(kyy)) / (m * (m - 1)) - 2 * kxy.sum() / m**2)


def inception_score(logits: np.ndarray) -> float:
    """exp(E_x KL(p(y|x) || p(y))), one split."""
    logp = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    p = np.exp(logp)
    logq = np.log(p.mean(0, keepdims=True))
    return float(np.exp((p * (logp - logq)).sum(1).mean()))


########################################################################################################################
# the weights file
########################################################################################################################
def test_missing_weights_name_the_setting_and_the_file(tmp_path):
    with pytest.raises(InceptionWeightsMissing) as e:
        check_weights(None)
    assert ENV_VAR in str(e.value) and INCEPTION_FILE in str(e.value) and "nothing is downloaded" in str(e.value)
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        check_weights(missing)
    assert isinstance(e.value, InceptionWeightsMissing) and str(missing) in str(e.value)


class Payload:
    """Unpickling calls os.system(command): what torch.load(weights_only=False) would run."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class NotATensor:
    pass


def test_pickled_code_is_refused_before_it_can_run(inception_weights, tmp_path):  # noqa: F811
    marker = tmp_path / "pwned"
    state = torch.load(inception_weights, weights_only=True)
    bad = tmp_path / "evil.pth"
    torch.save({**state, "fc.bias": Payload(f"touch {shlex.quote(str(marker))}")}, bad)
    with pytest.raises(ValueError, match="weights_only=True"):
        check_weights(bad)
    assert not marker.exists()
    # the payload is live: torch-fidelity's own torch.load(weights_only=False) would have run it
    torch.load(bad, weights_only=False)
    assert marker.exists()

    obj = tmp_path / "object.pth"
    torch.save({**state, "fc.bias": NotATensor()}, obj)
    with pytest.raises(ValueError, match="weights_only=True"):
        check_weights(obj)


def test_files_without_the_inception_tensors_are_refused(inception_weights, tmp_path):  # noqa: F811
    state = torch.load(inception_weights, weights_only=True)
    cases = {"other.pth": {"weight": torch.zeros(3)},
             "list.pth": [torch.zeros(3)],
             "shape.pth": {**state, "fc.weight": torch.zeros(1000, 2048)},
             "partial.pth": {k: v for k, v in state.items() if not k.startswith("Mixed_7c")}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match="Inception-v3|dict of tensors"):
            check_weights(tmp_path / name)
    (tmp_path / "text.pth").write_text("not a torch file")
    with pytest.raises(ValueError):
        check_weights(tmp_path / "text.pth")
    assert check_weights(inception_weights) == Path(inception_weights).resolve()


def test_safetensors_copy_is_converted_once_and_gives_the_same_metrics(inception_weights, tmp_path):  # noqa: F811
    from safetensors.torch import save_file

    state = torch.load(inception_weights, weights_only=True)
    st = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, st)
    pth = check_weights(st)
    assert pth.suffix == ".pth" and pth.parent == tmp_path / ".fidelity_cache"
    converted = torch.load(pth, weights_only=True)
    assert converted.keys() == state.keys() and all(torch.equal(converted[k], v) for k, v in state.items())
    mtime = pth.stat().st_mtime_ns
    os.utime(st)  # a new mtime: validated again, but the conversion (named by content) is reused
    assert check_weights(st) == pth and pth.stat().st_mtime_ns == mtime

    fake = noise(4, seed=3)
    via_st = fidelity_metrics(fake, fake, st, fid=False, kid=False, isc_splits=2)
    via_pth = fidelity_metrics(fake, fake, inception_weights, fid=False, kid=False, isc_splits=2)
    assert via_st == via_pth and via_st["is_mean"] > 1.0


########################################################################################################################
# the images
########################################################################################################################
def test_fidelity_images_keep_the_centre_square():
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32] = (255, 0, 0)
    wide[:, 32:96] = (0, 200, 0)
    wide[:, 96:] = (0, 0, 255)
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 128 high, 64 wide: red top, blue bottom
    gray = Image.fromarray(np.full((40, 40), 77, np.uint8), mode="L")
    out = fidelity_images([Image.fromarray(wide), Image.fromarray(tall), gray])
    assert out.shape == (3, 3, 299, 299) and out.dtype == torch.uint8
    green = torch.tensor([0, 200, 0], dtype=torch.int16).view(3, 1, 1)
    assert (out[:2].to(torch.int16) - green).abs().max() <= 2  # no red or blue reaches the crop
    assert (out[2].to(torch.int16) - 77).abs().max() <= 1  # grayscale -> 3 equal channels
    assert fidelity_images([Image.fromarray(wide)], size=64).shape == (1, 3, 64, 64)


########################################################################################################################
# the metrics
########################################################################################################################
def test_identical_sets_give_zero_fid_and_the_closed_form_kid(inception_weights, extractor):  # noqa: F811
    images = noise(6, seed=0)
    m = fidelity_metrics(images, images, inception_weights, isc=False)
    assert set(m) == {"fid", "kid_mean", "kid_std", "n_real", "n_fake"} and m["n_real"] == m["n_fake"] == 6
    assert abs(m["fid"]) < 1e-2
    x, _ = features(extractor, images)
    # identical sets: -(2/m)(mean diagonal - mean off-diagonal) of the kernel matrix, small and negative
    assert m["kid_mean"] == pytest.approx(kid_full(x, x), rel=1e-3)
    assert abs(m["kid_mean"]) < 0.05 and m["kid_std"] < 1e-4


def test_metrics_of_different_sets_match_an_independent_computation(inception_weights, extractor):  # noqa: F811
    real, fake = noise(6, seed=1), smooth(6, seed=2)
    m = fidelity_metrics(real, fake, inception_weights, isc_splits=1)
    xr, _ = features(extractor, real)
    xf, logits = features(extractor, fake)
    assert m["fid"] > 1.0
    assert m["fid"] == pytest.approx(frechet(xr, xf), rel=1e-3)
    assert m["kid_mean"] == pytest.approx(kid_full(xf, xr), rel=1e-3) and m["kid_mean"] > 0.01
    assert 1.0 <= m["is_mean"] <= 6.0  # at most the number of images in the split
    assert m["is_mean"] == pytest.approx(inception_score(logits), rel=1e-4)  # of the fakes, not the real ones
    with pytest.raises(ValueError, match="at least 2"):
        fidelity_metrics(real[:1], fake, inception_weights)


########################################################################################################################
# the callback
########################################################################################################################
def val_with_a_missing_image(corpus: Path) -> Path:  # noqa: F811
    """The demo corpus' t2i val records with one record whose image is missing, second in line."""
    lines = (corpus / "t2i/val.jsonl").read_text().splitlines()
    broken = json.dumps({"image_path": "images/val/missing.png", "prompt": "a picture that is not there"})
    out = corpus / "t2i/val_with_missing.jsonl"
    out.write_text("\n".join([lines[0], broken, *lines[1:]]) + "\n")
    return out


def gen_data(corpus: Path, val: Path) -> dict:  # noqa: F811
    return {"gen": {"train": str(corpus / "t2i/train.jsonl"), "val": str(val), "token_budget": 400}}


def test_logged_metrics_equal_a_recomputation_from_the_ema_generator(corpus, offline_wandb, inception_weights,  # noqa: F811
                                                                     tmp_path, caplog):
    from lightning.pytorch.loggers import WandbLogger

    import wandb

    lit, dm = make(corpus, data=gen_data(corpus, val_with_a_missing_image(corpus)))
    cb = GenerationQuality(inception_weights=str(inception_weights), n_images=6, px=32, steps=2, batch_size=3)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    tr = trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2, logger=logger, callbacks=[cb])
    with caplog.at_level(logging.WARNING, logger="unigendet.callbacks"):
        tr.fit(lit, datamodule=dm)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    _, history = read_run(next(run_dir.glob("run-*.wandb")))
    rows = [r for r in history if "val/fid" in r]
    assert len(rows) == 1 and rows[0]["trainer/global_step"] == 2  # one validation (step 2); no sanity check
    logged = rows[0]
    warned = [r.getMessage() for r in caplog.records if r.name == "unigendet.callbacks"]
    assert len(warned) == 1 and "1 of 5" in warned[0] and "missing_file" in warned[0], caplog.records

    # recompute: the 4 readable of the first 6 val records (the missing one and its prompt left out), the EMA
    # generator after training, chunks of 3 seeded 0 and 3
    records = [r for r in dm.gen_dm.split_records("val")[:6] if "missing" not in r.image]
    assert len(records) == 4
    real = [dm.gen_dm.record_image("val", r) for r in records]
    prompts = [r.prompt for r in records]
    fake = (lit.generate_images(prompts[:3], height=32, width=32, steps=2, seed=0, use_ema=True)
            + lit.generate_images(prompts[3:], height=32, width=32, steps=2, seed=3, use_ema=True))
    assert all(img.size == (32, 32) for img in fake)
    expected = fidelity_metrics(real, fake, inception_weights)
    for k in ("fid", "kid_mean", "kid_std", "is_mean", "is_std"):
        assert logged[f"val/{k}"] == pytest.approx(expected[k], rel=1e-4, abs=1e-9), k
    assert logged["val/fid"] > 0 and logged["val/is_mean"] >= 1.0


def test_missing_weights_warn_once_and_the_run_goes_on(corpus, offline_wandb, tmp_path, caplog,  # noqa: F811
                                                       monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    import wandb

    monkeypatch.delenv(ENV_VAR, raising=False)
    lit, dm = make(corpus, ema_decay=None)
    missing = tmp_path / "weights" / INCEPTION_FILE
    cb = GenerationQuality(inception_weights=str(missing), n_images=2, px=32, steps=1)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    tr = trainer(tmp_path, 4, limit_val_batches=1, val_check_interval=2, logger=logger, callbacks=[cb])
    with caplog.at_level(logging.INFO, logger="unigendet.callbacks"):
        tr.fit(lit, datamodule=dm)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    assert tr.global_step == 4
    notes = [r for r in caplog.records if r.name == "unigendet.callbacks"]
    assert len(notes) == 1 and notes[0].levelno == logging.WARNING
    assert str(missing) in notes[0].getMessage() and ENV_VAR in notes[0].getMessage()
    _, history = read_run(next(run_dir.glob("run-*.wandb")))
    assert sum("val/loss" in r or "val/acc" in r for r in history) >= 1  # validations were logged ...
    assert not any(k.startswith("val/fid") or k.startswith("val/kid") for r in history for k in r)  # ... no FID


def test_without_wandb_logger_is_a_noop_with_one_notice(corpus, tmp_path, caplog, monkeypatch):  # noqa: F811
    lit, dm = make(corpus, ema_decay=None)
    cb = GenerationQuality(inception_weights=str(tmp_path / "absent.pth"), n_images=2, px=32, steps=1)
    calls = []
    monkeypatch.setattr(cb, "measure", lambda *a: calls.append(a))
    with caplog.at_level(logging.INFO, logger="unigendet.callbacks"):
        trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2, callbacks=[cb]).fit(lit, datamodule=dm)
    notes = [r for r in caplog.records if r.name == "unigendet.callbacks"]
    assert len(notes) == 1 and "no-op" in notes[0].getMessage()  # not even the missing-weights warning
    assert calls == [] and cb._real is None
