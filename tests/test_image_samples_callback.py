"""ImageSamples with a real Trainer and a real offline W&B run: the logged grid, per-prompt images and p(fake) are read
back from the run's transaction log and media files and checked against an independent recomputation."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from callbacks.image_samples import ImageSamples
from tests.test_explanations_callback import history, offline_wandb  # noqa: F401  (offline_wandb is a fixture)
from tests.test_lit_module import corpus, make, trainer  # noqa: F401  (corpus is a fixture)

PX, STEPS = 32, 2
FIXED = ["a red square on a white background", "a blue circle at night"]


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def logged(run_dir: Path, meta: dict) -> list[np.ndarray]:
    """The pixels of a logged image (``image-file``) or image list (``images/separated``), from the run's files."""
    from PIL import Image

    names = meta["filenames"] if meta["_type"] == "images/separated" else [meta["path"]]
    return [pixels(Image.open(run_dir / "files" / name)) for name in names]


def test_samples_at_validations_and_every_n_steps_match_a_recomputation(corpus, offline_wandb, tmp_path):  # noqa: F811
    import torch
    from lightning.pytorch.loggers import WandbLogger
    from PIL import Image

    import wandb

    lit, dm = make(corpus)
    auto = ImageSamples(n_prompts=3, px=PX, steps=STEPS, seed=5, n_cols=2)  # prompts from the T2I val split, EMA
    fixed = ImageSamples(prompts=FIXED, px=PX, steps=STEPS, seed=7, every_n_steps=1, use_ema=False, key="fixed")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="t")
    tr = trainer(tmp_path, 4, limit_val_batches=1, val_check_interval=2, logger=logger, callbacks=[auto, fixed])
    tr.fit(lit, datamodule=dm)
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()
    hist, _ = history(run_dir)

    # prompts=None: the first 3 captions of the T2I val file (not the train file), kept
    val_captions = [json.loads(line)["prompt"] for line in (corpus / "t2i/val.jsonl").read_text().splitlines()]
    train_captions = [json.loads(line)["prompt"] for line in (corpus / "t2i/train.jsonl").read_text().splitlines()]
    prompts = val_captions[:3]
    assert auto.prompts == prompts and prompts != train_captions[:3]

    # when: after each validation (steps 2 and 4; no sanity check), and every step, once per step, for `fixed`
    rows = [r for r in hist if "samples/grid" in r]
    assert [r["trainer/global_step"] for r in rows] == [2, 4]
    fixed_rows = [r for r in hist if "fixed/grid" in r]
    assert [r["trainer/global_step"] for r in fixed_rows] == [1, 2, 3, 4]
    for row in rows:
        assert row["samples/grid"]["_type"] == "image-file"
        assert row["samples/grid"]["caption"] == "\n".join(f"{i}: {p}" for i, p in enumerate(prompts))
        assert row["samples/images"]["_type"] == "images/separated" and row["samples/images"]["count"] == 3

    # the last logged step's images are pixel-identical to a recomputation from the EMA weights (PNG is lossless)
    expected = lit.generate_images(prompts, height=PX, width=PX, steps=STEPS, seed=5, use_ema=True)
    last = logged(run_dir, rows[-1]["samples/images"])
    assert len(last) == 3 and all(np.array_equal(a, pixels(b)) for a, b in zip(last, expected, strict=True))
    live = lit.generate_images(prompts, height=PX, width=PX, steps=STEPS, seed=5, use_ema=False)
    assert any(not np.array_equal(a, pixels(b)) for a, b in zip(last, live, strict=True))  # the EMA did matter
    # the grid: rows of n_cols=2, white where no image falls, also written under default_root_dir/samples
    (grid,) = logged(run_dir, rows[-1]["samples/grid"])
    assert grid.shape == (2 * PX, 2 * PX, 3)
    tiles = [grid[:PX, :PX], grid[:PX, PX:], grid[PX:, :PX]]
    assert all(np.array_equal(t, pixels(e)) for t, e in zip(tiles, expected, strict=True))
    assert (grid[PX:, PX:] == 255).all()
    # on disk, each image has its caption (index: prompt | seed | p(fake)) printed under it
    saved = pixels(Image.open(tmp_path / "samples" / "grid_step_000004.png"))
    band = saved.shape[0] // 2 - PX
    assert saved.shape == (2 * (PX + band), 2 * PX, 3) and band > 0
    for i, e in enumerate(expected):
        x, y = (i % 2) * PX, (i // 2) * (PX + band)
        assert np.array_equal(saved[y: y + PX, x: x + PX], pixels(e)), i
        assert (saved[y + PX: y + PX + band, x: x + PX].max(axis=2) < 128).any(), i  # caption text
    assert (saved[PX + band:, PX:] == 255).all()
    from unigendet.evaluation.plots import caption_grid

    numbered = [f"{i}: {c}" for i, c in enumerate(rows[-1]["samples/images"]["captions"])]
    assert np.array_equal(saved, pixels(caption_grid(expected, numbered, 2)))
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"grid_step_{k:06d}.png" for k in (2, 4)]
    assert sorted(p.name for p in (tmp_path / "fixed").iterdir()) == [f"grid_step_{k:06d}.png" for k in (1, 2, 3, 4)]

    # determinism: same prompts + seeds + weights give the same images; the weights moved between validations
    again = auto.sample(tr, lit)[1]
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(again, expected, strict=True))
    first = logged(run_dir, rows[0]["samples/images"])
    assert all(not np.array_equal(a, b) for a, b in zip(first, last, strict=True))

    # p(fake): the detection head on the very images logged, from the same (EMA) weights; captions carry it
    p_fake = lit.detect_images([Image.fromarray(a) for a in last], use_ema=True)
    assert rows[-1]["samples/p_fake_mean"] == pytest.approx(float(p_fake.mean()), abs=1e-5)
    assert [rows[-1][f"samples/p_fake/{i}"] for i in range(3)] == pytest.approx(p_fake.tolist(), abs=1e-5)
    assert not torch.allclose(p_fake, lit.detect_images([Image.fromarray(a) for a in last], use_ema=False))
    logged_p = [rows[-1][f"samples/p_fake/{i}"] for i in range(3)]
    assert rows[-1]["samples/images"]["captions"] == [f"{p} | seed {5 + i} | p(fake) {q:.3f}"
                                                      for i, (p, q) in enumerate(zip(prompts, logged_p, strict=True))]

    # explicit prompts, live weights (use_ema=False), seeds 7 and 8
    assert [c.rsplit(" | p(fake) ", 1)[0] for c in fixed_rows[-1]["fixed/images"]["captions"]] == [
        f"{FIXED[0]} | seed 7", f"{FIXED[1]} | seed 8"]
    fixed_live = lit.generate_images(FIXED, height=PX, width=PX, steps=STEPS, seed=7, use_ema=False)
    assert all(np.array_equal(a, pixels(b))
               for a, b in zip(logged(run_dir, fixed_rows[-1]["fixed/images"]), fixed_live, strict=True))


def test_without_wandb_logger_is_a_noop_with_one_notice(corpus, tmp_path, caplog):  # noqa: F811
    lit, dm = make(corpus, ema_decay=None)
    cb = ImageSamples(n_prompts=2, px=PX, steps=STEPS, every_n_steps=1)
    with caplog.at_level(logging.INFO, logger="unigendet.callbacks"):
        trainer(tmp_path, 2, limit_val_batches=1, val_check_interval=2, callbacks=[cb]).fit(lit, datamodule=dm)
    notices = [r for r in caplog.records if r.name == "unigendet.callbacks"]
    assert len(notices) == 1 and "no-op" in notices[0].getMessage()
    assert cb.prompts is None  # never sampled
    assert not (tmp_path / "samples").exists() and not list(tmp_path.rglob("*.png"))
