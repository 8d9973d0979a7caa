"""GenerationQuality: FID, KID and Inception Score of the generator on a fixed held-out prompt set, logged to W&B.

Features:

* **A fixed held-out set**: the first ``n_images`` records of the ``val`` split of the data module's
  ``text_to_image`` side (``gen_dm`` of the co-evolution data module, else the data module itself); their real
  images are decoded once with the datamodule's public ``record_image`` and cached. Unreadable ones are reported
  once (count by reason) and left out together with their prompts, so real and generated sets stay paired.
* **Reproducible fakes**: ``pl_module.generate_images(..., use_ema=True)`` at ``px`` x ``px``, ``steps`` ODE steps and
  ``cfg_scale``, in chunks of ``batch_size``; the chunk starting at record ``i`` uses seed ``seed + i``, at every
  validation, so the numbers move only with the weights.
* **Metrics**: :func:`unigendet.evaluation.fidelity.fidelity_metrics` (torch-fidelity, offline, on the module's
  device) logged
  as ``<key>/fid``, ``<key>/kid_mean``, ``<key>/kid_std``, ``<key>/is_mean``, ``<key>/is_std`` at
  ``trainer.global_step``.
* **When**: at the end of every ``every_n_validations``-th validation (not the sanity check); the count is saved in
  checkpoints.
* **No Inception weights, no metrics, no crash**: ``inception_weights`` (or ``$UNIGENDET_INCEPTION_WEIGHTS``) must
  point at torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (or a ``.safetensors`` copy); when it is
  unset, missing or invalid, one warning says so and what to set, and the callback does nothing for the rest of the run.
* **Rank zero only**: other ranks do nothing, except under FSDP2, where every rank generates (the parameter
  all-gathers need them all) and only rank zero scores and logs.
* **No W&B logger, no work**: one notice on logger ``unigendet.callbacks``, then nothing.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger

from callbacks.wandb_only import find_wandb, runs_here
from unigendet.evaluation.fidelity import ENV_VAR, fidelity_metrics, inception_weights
from unigendet.inputs.skips import SkipCounter

log = logging.getLogger("unigendet.callbacks")

METRICS = ("fid", "kid_mean", "kid_std", "is_mean", "is_std")


class GenerationQuality(Callback):
    def __init__(self, inception_weights: str | None = None, n_images: int = 64, px: int = 64, steps: int = 25,
                 cfg_scale: float | None = None, seed: int = 0, batch_size: int = 8, kid_subset_size: int | None = None,
                 every_n_validations: int = 1, key: str = "val") -> None:
        if n_images < 2:
            raise ValueError(f"n_images must be >= 2 (FID/KID/IS need two images a side), got {n_images}")
        if every_n_validations < 1 or batch_size < 1:
            raise ValueError(f"every_n_validations and batch_size must be >= 1, got {every_n_validations}, "
                             f"{batch_size}")
        self.inception_weights = inception_weights
        self.n_images, self.px, self.steps, self.cfg_scale, self.seed = n_images, px, steps, cfg_scale, seed
        self.batch_size, self.kid_subset_size, self.every_n_validations, self.key = (
            batch_size, kid_subset_size, every_n_validations, key)
        self._wandb: WandbLogger | None = None
        self._weights: Path | None = None  # the validated .pth handed to torch-fidelity
        self._disabled = False
        self._validations = 0
        self._prompts: list[str] | None = None
        self._real: list | None = None  # PIL images, decoded once, paired with _prompts

    # ----------------------------------------------------------------------------------------------
    def check(self, pl_module: L.LightningModule) -> None:
        """ValueError when the model cannot generate ``px`` x ``px`` images (the CLI calls this as it builds the
        run; ``setup`` again before any training)."""
        pl_module.cfg.check_image_size(self.px, self.px, what=f"GenerationQuality px={self.px}:")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check(pl_module)
        self._wandb = find_wandb(trainer, type(self).__name__)
        if self._wandb is None:
            return
        if self._weights is None and not self._disabled:
            self._resolve_weights(trainer)

    def _resolve_weights(self, trainer: L.Trainer) -> None:
        path = self.inception_weights if self.inception_weights is not None else os.environ.get(ENV_VAR)
        try:
            self._weights = inception_weights(path)
        except (FileNotFoundError, ValueError) as e:  # InceptionWeightsMissing is a FileNotFoundError
            self._disable(trainer, f"no usable Inception weights, so no FID/KID/IS for the rest of this run: {e} "
                                   f"(set GenerationQuality(inception_weights=...) or ${ENV_VAR})")

    def _disable(self, trainer: L.Trainer, why: str) -> None:
        self._disabled = True
        if trainer.is_global_zero:
            log.warning("GenerationQuality: %s", why)

    def _active(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        return self._wandb is not None and not self._disabled and runs_here(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._active(trainer, pl_module):
            return
        self._validations += 1
        if self._validations % self.every_n_validations == 0:
            self.log_metrics(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"validations": self._validations}

    def load_state_dict(self, state_dict: dict) -> None:
        self._validations = state_dict.get("validations", 0)

    # ----------------------------------------------------------------------------------------------
    def _load_real(self, trainer: L.Trainer) -> None:
        dm = trainer.datamodule
        t2i = dm.text_to_image
        if t2i is None:
            raise TypeError(f"GenerationQuality needs text-to-image data, got {type(dm).__name__}")
        records = list(t2i.split_records("val"))[: self.n_images]
        skips = SkipCounter()
        images = [t2i.record_image("val", rec, skips) for rec in records]
        kept = [(rec.prompt, img) for rec, img in zip(records, images, strict=True) if img is not None]
        if skips.total and trainer.is_global_zero:
            log.warning("GenerationQuality: %d of %d held-out images could not be read (%s); they and their prompts "
                        "are left out", skips.total, len(records), dict(skips.counts))
        self._prompts = [p for p, _ in kept]
        self._real = [img for _, img in kept]

    def generate(self, pl_module: L.LightningModule, prompts: list[str]) -> list:
        """The generated images for ``prompts`` (EMA weights), chunk at ``i`` seeded with ``seed + i``."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            out += pl_module.generate_images(prompts[i: i + self.batch_size], height=self.px, width=self.px,
                                             steps=self.steps, seed=self.seed + i, cfg_scale=self.cfg_scale,
                                             use_ema=True)
        return out

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float] | None:
        """FID/KID/IS of the current generator on the held-out set (rank zero), or None when it cannot run."""
        if self._real is None:
            self._load_real(trainer)
        if len(self._real) < 2:
            self._disable(trainer, f"only {len(self._real)} readable held-out images, FID/KID/IS need two")
            return None
        fake = self.generate(pl_module, self._prompts)
        if not trainer.is_global_zero:
            return None
        return fidelity_metrics(self._real, fake, self._weights, kid_subset_size=self.kid_subset_size,
                                batch_size=max(self.batch_size, 32), device=str(pl_module.device))

    def log_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self.measure(trainer, pl_module)
        if metrics is not None and trainer.is_global_zero:
            self._wandb.log_metrics({f"{self.key}/{k}": metrics[k] for k in METRICS}, step=trainer.global_step)
