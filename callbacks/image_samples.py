"""ImageSamples: how the generator's samples evolve, and how the detector judges them, on fixed prompts and seeds.

Features:

* **Fixed prompts and noise**, so runs and steps are comparable: ``prompts`` as given, else the first ``n_prompts``
  captions of the text-to-image ``val`` split (``train`` when there is none), chosen once and kept. Prompt ``i``
  always gets seed ``seed + i`` (:meth:`LitUniGenDet.generate_images` seeds each image on its own).
* **Logged to W&B** under ``key`` (default ``samples``): ``<key>/grid`` (one image, rows of ``n_cols``, captioned
  ``index: prompt``), ``<key>/images`` (one image per prompt, captioned ``prompt | seed s | p(fake) p``),
  ``<key>/p_fake_mean`` and ``<key>/p_fake/<i>``. A grid with each image's caption (``index: prompt | seed s |
  p(fake) p``) printed under it (:func:`unigendet.evaluation.plots.caption_grid`) is also written to
  ``<save_dir or trainer.default_root_dir>/<key>/grid_step_<step>.png`` (by default ``.../samples/...``; the key
  keeps two instances with different keys apart), so the PNG on disk says what each image was asked to show.
* **The co-evolution in one view**: p(fake) is the detection head's verdict
  (:meth:`LitUniGenDet.detect_images`) on the very images logged, from the same weights (EMA by default). Without a
  detection side in the datamodule (``detection`` is None), p(fake) is skipped with one notice.
* **Size** ``px`` x ``px``; ``px=None``: the model's largest side, at most 512 (``experiments/base.yaml``). A size the
  model cannot generate is an error when the run is built (``check``), not at the first validation.
* **When**: at the end of every validation (not the sanity check) with ``on_validation``, and/or after every
  ``every_n_steps`` training steps; at most once per training step.
* **Rank zero only**: other ranks do nothing, except under FSDP2, where every rank must take part in the parameter
  all-gathers, so every rank generates (the same images) and only rank zero writes and logs.
* **No W&B logger, no work**: one notice on logger ``unigendet.callbacks``, then nothing.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import torch

from callbacks.wandb_only import PeriodicWandbCallback
from unigendet.evaluation.plots import caption_grid

log = logging.getLogger("unigendet.callbacks")
AUTO_PX = 512  # px=None: the model's largest side, at most this


def tile(images: list, n_cols: int):
    """The images side by side in rows of ``n_cols`` (top-left first), on white; all images the size of the first."""
    from PIL import Image

    w, h = images[0].size
    cols = min(n_cols, len(images))
    grid = Image.new("RGB", (cols * w, math.ceil(len(images) / cols) * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def first_captions(dm, n: int) -> list[str]:
    """The first ``n`` captions of the text-to-image side's ``val`` split (``train`` when it has no ``val``)."""
    t2i = dm.text_to_image
    if t2i is None:
        raise TypeError(f"ImageSamples without prompts needs text-to-image data, got {type(dm).__name__}")
    split = "val" if t2i.val else "train"
    return [rec.prompt for rec in t2i.split_records(split)[:n]]


class ImageSamples(PeriodicWandbCallback):
    def __init__(self, prompts: list[str] | None = None, n_prompts: int = 8, px: int | None = 64, steps: int = 25,
                 cfg_scale: float | None = None, seed: int = 0, every_n_steps: int = 0, on_validation: bool = True,
                 use_ema: bool = True, n_cols: int = 8, key: str = "samples", save_dir: str | None = None) -> None:
        if prompts is not None and not prompts:
            raise ValueError("prompts must be None or a non-empty list")
        if n_prompts < 1 or n_cols < 1 or (px is not None and px < 1) or steps < 1:
            raise ValueError(f"n_prompts, n_cols, px and steps must be >= 1, got {n_prompts}, {n_cols}, {px}, {steps}")
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: off), got {every_n_steps}")
        self.prompts = list(prompts) if prompts is not None else None
        self.n_prompts, self.px, self.steps, self.cfg_scale, self.seed = n_prompts, px, steps, cfg_scale, seed
        self.every_n_steps, self.on_validation, self.use_ema = every_n_steps, on_validation, use_ema
        self.n_cols, self.key, self.save_dir = n_cols, key, save_dir
        self._last_step: int | None = None
        self._warned_no_detector = False

    def check(self, pl_module: L.LightningModule) -> None:
        """``px=None`` becomes the largest side the model generates, at most :data:`AUTO_PX`; a ValueError when the
        model cannot generate ``px`` x ``px`` images (the CLI calls this as it builds the run, ``setup`` again before
        any training)."""
        if self.px is None:
            self.px = min(AUTO_PX, pl_module.cfg.max_image_side)
        pl_module.cfg.check_image_size(self.px, self.px, what=f"ImageSamples px={self.px}:")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check(pl_module)
        super().setup(trainer, pl_module, stage)

    # ----------------------------------------------------------------------------------------------
    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[list[str], list, torch.Tensor | None]:
        """(prompts, PIL images, p(fake) of each image or None without a detection side) for the current weights."""
        dm = trainer.datamodule
        if self.prompts is None:
            self.prompts = first_captions(dm, self.n_prompts)
        images = pl_module.generate_images(self.prompts, height=self.px, width=self.px, steps=self.steps,
                                           seed=self.seed, cfg_scale=self.cfg_scale, use_ema=self.use_ema)
        if dm.detection is None:
            if not self._warned_no_detector and trainer.is_global_zero:
                log.info("ImageSamples: the datamodule has no detection side, p(fake) is not logged")
            self._warned_no_detector = True
            return self.prompts, images, None
        return self.prompts, images, pl_module.detect_images(images, use_ema=self.use_ema)

    def log_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a validation right after an every_n_steps sample: same weights
            return
        self._last_step = step
        prompts, images, p_fake = self.sample(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        import wandb

        grid = tile(images, self.n_cols)
        captions = [f"{p} | seed {self.seed + i}" + ("" if p_fake is None else f" | p(fake) {p_fake[i]:.3f}")
                    for i, p in enumerate(prompts)]
        path = Path(self.save_dir or trainer.default_root_dir) / self.key / f"grid_step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        caption_grid(images, [f"{i}: {c}" for i, c in enumerate(captions)], self.n_cols).save(path)
        metrics = {f"{self.key}/grid": wandb.Image(grid, caption="\n".join(f"{i}: {p}" for i, p in enumerate(prompts))),
                   f"{self.key}/images": [wandb.Image(img, caption=c) for img, c in zip(images, captions, strict=True)]}
        if p_fake is not None:
            metrics[f"{self.key}/p_fake_mean"] = float(p_fake.mean())
            metrics.update({f"{self.key}/p_fake/{i}": float(p) for i, p in enumerate(p_fake)})
        self._wandb.log_metrics(metrics, step=step)
