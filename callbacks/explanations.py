"""ForensicExplanations: a W&B Table of the model's verdicts and written explanations on a fixed held-out panel.

Features:

* **A fixed panel**, so runs and steps are comparable: the first ``n_images`` records of the datamodule's
  detection ``val`` split, balanced (half fake, half real, in record order) when the split has enough of each label.
* **Per image**: the true label, p(fake) from the real/fake head, the greedy KV-cached explanation
  (:meth:`unigendet.inference.Engine.detect`), the reference answer, ROUGE-L F (stemmed) between the two (as
  ``unigendet test`` scores it), the category and the image itself.
* **When**: at the end of every validation (not the sanity check) with ``on_validation``, and/or after every
  ``every_n_steps`` training steps. The EMA weights are used when the module keeps them (as validation does),
  in eval mode and without gradients; the train/eval mode is restored afterwards.
* **Rank zero only**: other ranks do nothing, except under FSDP2, where every rank must take part in the parameter
  all-gathers, so every rank runs the (identical, greedy) panel and only rank zero logs.
* **No W&B logger, no work**: one notice on logger ``unigendet.callbacks``, then nothing.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

from callbacks.wandb_only import PeriodicWandbCallback
from unigendet.inputs.skips import SkipCounter
from unigendet.training.sampling import sampling_weights

log = logging.getLogger("unigendet.callbacks")

COLUMNS = ["id", "image", "category", "label", "p_fake", "predicted", "explanation", "reference", "rouge_l"]
LABELS = {0: "fake", 1: "real"}


def choose_panel(records, n: int) -> list:
    """The first ``n`` records, balanced between fake (0) and real (1) when each label has enough; record order."""
    want = {0: n // 2, 1: n - n // 2}
    chosen: list[int] = []
    for i, rec in enumerate(records):
        if want.get(rec.label, 0) > 0:
            want[rec.label] -= 1
            chosen.append(i)
    if len(chosen) < n:  # a label ran short: fill with the next records of the other one
        taken = set(chosen)
        chosen += [i for i in range(len(records)) if i not in taken][: n - len(chosen)]
    return [records[i] for i in sorted(chosen)]


class ForensicExplanations(PeriodicWandbCallback):
    def __init__(self, every_n_steps: int | None = None, on_validation: bool = True, n_images: int = 8,
                 max_new_tokens: int = 64, key: str = "val/explanations") -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive integer or None, got {every_n_steps}")
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        self.every_n_steps, self.on_validation = every_n_steps, on_validation
        self.n_images, self.max_new_tokens, self.key = n_images, max_new_tokens, key
        self._panel: list | None = None  # records
        self._images: list | None = None  # PIL images, decoded once
        self._rouge = None

    # ----------------------------------------------------------------------------------------------
    # ----------------------------------------------------------------------------------------------
    def _load_panel(self, dm) -> None:
        if getattr(dm, "detection", None) is None:  # the data contract's detection side (training.data_contract)
            raise TypeError(f"ForensicExplanations needs a detection datamodule, got {type(dm).__name__}")
        dm = dm.detection
        records = dm.split_records("val")
        self._panel = choose_panel(records, self.n_images)
        skips = SkipCounter()
        self._images = [dm.record_image("val", r, skips) for r in self._panel]
        bad = [r.id for r, img in zip(self._panel, self._images, strict=True) if img is None]
        if bad:
            raise ValueError(f"panel images could not be read: {bad} ({dict(skips.counts)})")

    def rouge_l(self, prediction: str, reference: str) -> float:
        if self._rouge is None:
            from unigendet.evaluation.text_metrics import RougeL

            self._rouge = RougeL()  # stemmed, as the evaluation protocol scores explanations
        return self._rouge(prediction, reference)

    @torch.no_grad()
    def detect_panel(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[list]:
        """The table rows (see ``COLUMNS``) for the current (EMA) weights."""
        import wandb
        from unigendet.inference import Engine

        dm = trainer.datamodule
        if self._panel is None:
            self._load_panel(dm)
        results = []
        with sampling_weights(pl_module.model, getattr(pl_module, "ema", None), use_ema=True) as model:
            engine = Engine(model, dm.tok)
            engine.vit_tf, engine.vae_tf = dm.vit_tf(), dm.vae_tf()  # as the validation batches see them
            for rec, img in zip(self._panel, self._images, strict=True):  # records may ask different questions
                results += engine.detect([img], prompt=rec.prompt, with_vae=dm.detection.with_vae,
                                         max_new_tokens=self.max_new_tokens)
        rows = []
        for rec, img, det in zip(self._panel, self._images, results, strict=True):
            rows.append([rec.id, wandb.Image(img, caption=f"{LABELS[rec.label]} / {rec.cate}"), rec.cate,
                         LABELS[rec.label], det.p_fake, det.label, det.explanation, rec.answer,
                         self.rouge_l(det.explanation, rec.answer)])
        return rows

    def log_now(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.log_panel(trainer, pl_module)

    def log_panel(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rows = self.detect_panel(trainer, pl_module)
        if trainer.is_global_zero:
            self._wandb.log_table(key=self.key, columns=COLUMNS, data=rows, step=trainer.global_step)
