"""LitUniGenDet: the co-evolution training loop as ONE LightningModule; GDUF, DIGA and ablations are its stages.

Features:
* manual optimisation with two optimisers: a **detection update** (answer CE + real/fake head CE) on the detector
  side (und expert, ViT, connector, heads) and a **generation update** (flow MSE + DIGA cosine) on the generator side
  (gen expert, vae2llm, llm2vae, time embedder, DIGA projector), each with its own LR schedule and clipping, in that
  order inside every training step; update ratios via ``det_every`` / ``gen_every`` (:class:`Stage`);
* ``stage.joint=True`` is GDUF as the authors ran it: ONE update of all parameters on the weighted sum of all losses;
* DIGA (:func:`unigendet.training.losses.diga_loss`) against a frozen teacher taken at the start
  (``teacher="frozen"``) or refreshed every K steps (``teacher="snapshot"``);
* fresh fakes (:mod:`unigendet.training.fresh_fakes`): every J steps the current generator's images join the
  detection update as fakes;
* EMA of the weights (validation, evaluation, export, optionally the teacher); losses are token means across ranks;
  a non-finite loss stops with an error naming the step and the term, or (``on_nan="skip"``) skips the update,
  counted and logged;
* ``global_step`` counts training steps, not optimiser steps (Lightning issue #17958).

The data module is used through :class:`unigendet.training.data_contract.TrainingData`; callbacks get what they need
from the step outputs: ``training_step`` returns its logged values and ``passes`` (which packed batches ran forward,
for Throughput), ``validation_step`` returns the batch's p(fake) and labels (for DetectionMetrics).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning as L
import torch
from torch import Tensor

from unigendet.checkpoint.resume import drop_redone_checkpoints, restore_run_state, run_state, set_rng_state
from unigendet.distributed.sharding import FSDPConfig
from unigendet.evaluation.protocol import EvalConfig
from unigendet.model.config import ModelOverrides, PresetOrFolder
from unigendet.model.packing import PackedBatch
from unigendet.model.unigendet import UniGenDet
from unigendet.training import losses as loss_fns
from unigendet.training import sampling
from unigendet.training.build import build_networks, copy_weights, ready_teacher, resolve_config
from unigendet.training.data_contract import TrainingData, training_data
from unigendet.training.ema import EMA
from unigendet.training.fresh_fakes import FreshFakes
from unigendet.training.optim import OptimConfig, build_optimizer, build_scheduler, partition
from unigendet.training.stages import LossWeights, Stage
from unigendet.training.updates import advance_schedules, apply_update
from unigendet.training.validation import ValidationPass

log = logging.getLogger("unigendet.train")

try:  # as a command-line type, a preset-name typo fails while LightningCLI parses the config
    from jsonargparse.typing import register_type
except ImportError:  # pragma: no cover - jsonargparse comes with lightning's CLI extra
    pass
else:
    register_type(PresetOrFolder, serializer=str, deserializer=PresetOrFolder)


class LitUniGenDet(L.LightningModule):
    def __init__(self, model_name: PresetOrFolder | None = None, model_overrides: ModelOverrides | None = None,
                 init_from: str | None = None, init_ae_from: str | None = None,
                 loss: LossWeights | None = None, stage: Stage | None = None, optim: OptimConfig | None = None,
                 freeze: list[str] | None = None, ema_decay: float | None = 0.999, attn_backend: str = "auto",
                 seed: int = 0, fsdp: FSDPConfig | None = None, rank_seeds: bool = True,
                 evaluation: EvalConfig | None = None) -> None:
        """
        Args:
            model_name: a preset (``tiny``, ``demo``, ``debug``, ``bagel-7b-mot``) or a BAGEL / UniGenDet folder;
                None: the architecture of the ``init_from`` folder (fine-tuning BAGEL needs only ``init_from``).
            model_overrides: config overrides for a preset (:class:`unigendet.model.config.ModelOverrides`, or its
                nested dict from Python), e.g. ``{"mot": {"n_layers": 4}}``.
            init_from: weights to start from: a BAGEL / UniGenDet folder (random init when None).
            init_ae_from: a trained autoencoder file (``unigendet train-ae``), loaded into the frozen VAE after
                ``init_from`` (the ``demo`` preset's small learned AE; without it that AE is random).
            loss: the loss weights; stage: what the stage trains (:mod:`unigendet.training.stages`).
            freeze: top-level parts to freeze (``vit``, ``embed``, ...); the VAE is always frozen.
            ema_decay: EMA of the weights (None: off).
            fsdp: how the network is sharded when the trainer's strategy provides a device mesh
                (``unigendet.distributed.strategy.FSDP2Strategy``); ignored otherwise.
            rank_seeds: after the (identical) initialisation, rank r's random stream (flow noise, posterior
                samples) starts from ``seed + r``, so ranks draw independent noise; False: every rank draws the
                same noise (only for checking a multi-process run against a single process).
            evaluation: what ``test`` evaluates after the test loop (:class:`unigendet.evaluation.protocol.EvalConfig`):
                detection with explanations (Acc / F1 from the head and from the text, ROUGE-L, CSS) and generation
                (FID / KID / IS, the detector's p(fake)); report files under ``<log dir>/eval``.
        """
        super().__init__()
        self.automatic_optimization = False
        self.loss_w, self.stage = loss or LossWeights(), stage or Stage()
        self.optim_cfg, self.fsdp_cfg = optim or OptimConfig(), fsdp or FSDPConfig()
        self.eval_cfg = evaluation or EvalConfig()
        model_name, overrides, self.cfg = resolve_config(model_name, model_overrides, init_from, init_ae_from)
        # ``evaluation`` is deliberately not a hyperparameter: LightningCLI's ``test --ckpt_path`` applies the
        # checkpoint's hyperparameters OVER the command line, which would silently replace the evaluation settings
        # given for this test run with the defaults the training run saved
        self.save_hyperparameters({"model_name": model_name, "model_overrides": overrides, "init_from": init_from,
                                   "init_ae_from": init_ae_from, "loss": dataclasses.asdict(self.loss_w),
                                   "stage": dataclasses.asdict(self.stage), "optim": dataclasses.asdict(self.optim_cfg),
                                   "freeze": list(freeze or []), "ema_decay": ema_decay, "attn_backend": attn_backend,
                                   "seed": seed, "fsdp": dataclasses.asdict(self.fsdp_cfg), "rank_seeds": rank_seeds})
        if self.stage.fresh_fakes_every:  # settings that generate images are checked now, not when first used
            px = self.stage.fresh_fake_px
            self.cfg.check_image_size(px, px, what=f"stage.fresh_fake_px={px}:")
        self.model: UniGenDet | None = None
        # the "frozen" teacher sits in a list, out of the module tree and the checkpoints: it is rebuilt from the
        # initial weights by configure_model; a "snapshot" teacher is the submodule ``teacher_net`` (checkpointed)
        self._teacher: list[UniGenDet] = []
        self.teacher_net: UniGenDet | None = None
        self.ema: EMA | None = None
        self.counters = {"batches": 0, "skipped_nan": 0, "fresh_fakes_seen": 0}
        self.fresh = FreshFakes()
        self._pending_rng: dict | None = None
        self.validation = ValidationPass()

    # ----------------------------------------------------------------------------------------------
    # building
    # ----------------------------------------------------------------------------------------------
    @property
    def data(self) -> TrainingData | None:
        return training_data(self._trainer)

    @property
    def diga_layer(self) -> int:
        return self.stage.diga_layer or self.cfg.head.diga_layer

    def configure_model(self) -> None:
        if self.model is not None:
            return
        if self.stage.diga and not 1 <= self.diga_layer <= self.cfg.mot.n_layers:
            raise ValueError(f"diga_layer {self.diga_layer} is outside the model's 1..{self.cfg.mot.n_layers} "
                             "decoder layers")
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        hp = self.hparams
        model, teacher = build_networks(
            self.cfg, self.stage, seed=hp.seed, init_from=hp.init_from, init_ae_from=hp.get("init_ae_from"),
            freeze=hp.freeze, attn_backend=hp.attn_backend, shared=self.optim_cfg.shared, mesh=mesh,
            fsdp=self.fsdp_cfg, device=self.trainer.strategy.root_device if mesh is not None else None)
        self.model = model
        if hp.ema_decay is not None:
            self.ema = EMA(model, decay=hp.ema_decay)
        if teacher is not None:
            if self.stage.teacher == "snapshot":
                self.teacher_net = teacher  # refreshed during training: checkpointed, so a resume continues with it
            else:
                self._teacher = [teacher]
            self.refresh_teacher()
        # training's random stream (flow noise, posterior samples) starts from the seed (+ rank), whatever the
        # initialisation drew (a folder loaded whole or shard by shard, a random init)
        rank = self.trainer.global_rank if self._trainer is not None and hp.rank_seeds else 0
        torch.manual_seed(hp.seed + rank)

    def refresh_teacher(self) -> None:
        """The DIGA teacher takes the current network's weights (or their EMA), in place."""
        copy_weights(self.model, self.teacher, ema=self.ema if self.stage.teacher_from_ema else None)

    @property
    def teacher(self) -> UniGenDet | None:
        teacher = self.teacher_net if self.teacher_net is not None else (self._teacher[0] if self._teacher else None)
        return None if teacher is None else ready_teacher(teacher, self.model)

    def configure_optimizers(self):
        sides = partition(self.model, self.optim_cfg.shared)
        if not self.trainer or self.trainer.max_steps <= 0:
            raise ValueError("set trainer.max_steps: the LR schedules are defined over a number of steps")
        opts, scheds = [], []
        for side, lr in (("det", self.optim_cfg.lr_det), ("gen", self.optim_cfg.lr_gen)):
            params = [(n, p) for n, p in sides[side] if p.requires_grad]
            if not params:  # a frozen side still gets an (empty-ish) optimiser so indices stay stable
                params = [(f"_{side}_placeholder", torch.nn.Parameter(torch.zeros(1), requires_grad=False))]
            opt = build_optimizer(params, lr, self.optim_cfg)
            opts.append(opt)
            scheds.append(build_scheduler(opt, self.optim_cfg, self.trainer.max_steps,
                                          warn=not scheds and self.trainer.is_global_zero))
        return opts, scheds

    # ----------------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------------
    def token_mean(self, total: Tensor, count: int) -> Tensor:
        return loss_fns.token_mean(total, count, self._trainer)

    def detection_losses(self, batch: PackedBatch) -> dict[str, Tensor]:
        return loss_fns.detection_losses(self.model, batch, self.token_mean)

    def generation_losses(self, batch: PackedBatch, teacher_batch: PackedBatch | None = None) -> dict[str, Tensor]:
        diga = self.stage.diga and teacher_batch is not None
        return loss_fns.generation_losses(self.model, batch, self.token_mean, teacher=self.teacher if diga else None,
                                          teacher_batch=teacher_batch, diga_layer=self.diga_layer if diga else None)

    def training_step(self, batch: dict[str, PackedBatch], batch_idx: int) -> dict[str, Any]:
        """The co-evolution step: a detection update, then a generation update (each when the stage trains that side
        and its ratio says so); or, with ``stage.joint``, one update on the weighted sum of all losses."""
        step = self.counters["batches"]
        self.counters["batches"] += 1
        data, s, w = self.data, self.stage, self.loss_w
        if data is not None:
            data.record_train_batch(batch)
        if s.fresh_fakes_every and step % s.fresh_fakes_every == 0 and step > 0:
            self.fresh.draw(self.generate_images, data, self.counters["batches"], n=s.fresh_fakes,
                            px=s.fresh_fake_px, steps=s.fresh_fake_steps)
        logs: dict[str, float] = {}
        passes: list[tuple[str, bool, int | None]] = []  # (batch key, trained?, decoder layers run) per forward
        stepped: list[str] = []  # the optimisers that stepped in this batch
        if s.joint:
            losses = {**self.detection_losses(batch["det"]), **self.generation_losses(batch["gen"])}
            passes += [("det", True, None), ("gen", True, None)]
            total = w.ce * losses["loss_ce"] + w.det * losses["loss_det"] + w.mse * losses["loss_mse"]
            stepped += self.update("joint", total, losses, step, stepped)
            logs.update(losses)
        if not s.joint and s.train_det and "det" in batch and step % s.det_every == 0:
            losses = self.detection_losses(batch["det"])
            passes.append(("det", True, None))
            total = w.ce * losses["loss_ce"] + w.det * losses["loss_det"]
            fresh = self.fresh.batch(self.cfg, self.device)
            if fresh is not None:
                self.counters["fresh_fakes_seen"] += len(fresh.sample_lens)
                f = self.detection_losses(fresh)
                losses["loss_fresh"] = w.ce * f["loss_ce"] + w.det * f["loss_det"]
                total = total + losses["loss_fresh"]
                passes.append(("fresh", True, None))
            stepped += self.update("det", total, losses, step, stepped)
            logs.update(losses)
        if not s.joint and s.train_gen and "gen" in batch and step % s.gen_every == 0:
            losses = self.generation_losses(batch["gen"], batch.get("teacher"))
            passes.append(("gen", True, None))
            if "loss_diga" in losses:
                passes.append(("teacher", False, self.diga_layer))
            total = w.mse * losses["loss_mse"] + w.diga * losses.get("loss_diga", 0.0)
            stepped += self.update("gen", total, losses, step, stepped)
            logs.update(losses)
        self.after_updates(stepped, step)
        return self.log_step(logs, batch, step, passes, data)

    def update(self, side: str, total: Tensor, losses: dict[str, Tensor], step: int, stepped: list[str]) -> list[str]:
        """Apply ``side``'s update (:mod:`unigendet.training.updates`) unless a loss term is non-finite on some rank;
        returns the sides whose optimiser stepped."""
        if not loss_fns.all_finite(losses, step, self._trainer, self.stage.on_nan, self.counters):
            return []
        return apply_update(self, side, total, counted=not stepped)

    def after_updates(self, stepped: list[str], step: int) -> None:
        if stepped:
            advance_schedules(self.lr_schedulers(), stepped)
            if self.ema is not None:
                self.ema.update(self.model)
        s = self.stage
        if s.diga and s.teacher == "snapshot" and step > 0 and step % s.teacher_refresh == 0:
            self.refresh_teacher()

    def log_step(self, losses: dict[str, Tensor], batch, step: int, passes: list,
                 data: TrainingData | None) -> dict[str, Any]:
        sch_det, sch_gen = self.lr_schedulers()
        logs = {f"train/{k}": v.item() for k, v in losses.items() if not k.startswith("_")}
        logs.update({"train/lr_det": sch_det.get_last_lr()[0], "train/lr_gen": sch_gen.get_last_lr()[0],
                     "train/skipped_nan": self.counters["skipped_nan"],
                     "train/fresh_fakes_seen": self.counters["fresh_fakes_seen"]})
        if data is not None:
            logs.update(data.skip_metrics(batch))
        self.log_dict(logs, prog_bar=False, on_step=True, batch_size=1)
        for key, name in (("train/loss_det", "det"), ("train/loss_mse", "mse")):
            if key in logs:
                self.log(name, logs[key], prog_bar=True, batch_size=1)
        # this step's values (callbacks get them as ``outputs``; callback_metrics keep stale ones), and its passes
        return {**logs, "step": step, "passes": passes}

    # ----------------------------------------------------------------------------------------------
    # images from the network being trained (fresh fakes, callbacks, evaluation)
    # ----------------------------------------------------------------------------------------------
    def generate_images(self, prompts: list[str], *, height: int, width: int, steps: int = 25, seed: int = 0,
                        cfg_scale: float | None = None, use_ema: bool = False) -> list:
        return sampling.generate_images(self.model, self.ema, self.trainer.datamodule.tok, prompts, height=height,
                                        width=width, steps=steps, seed=seed, cfg_scale=cfg_scale, use_ema=use_ema)

    def detect_images(self, images: list, *, use_ema: bool = False, batch_size: int = 8) -> Tensor:
        return sampling.detect_images(self.model, self.ema, self.data, images, use_ema=use_ema,
                                      batch_size=batch_size)

    # ----------------------------------------------------------------------------------------------
    # validation / test / predict
    # ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self.validation.start(self.model, self.ema)

    def validation_step(self, batch: PackedBatch, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Returns the batch's head ``p_fake`` and ``label`` (for DetectionMetrics); tallies CE and flow MSE."""
        if isinstance(batch, dict):
            batch = batch.get("det") or batch.get("gen")
        return self.validation.step(self.model, batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.validation.leave_ema()
        metrics = self.validation.metrics()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False, sync_dist=True)
        if "acc" in metrics:
            self.log("val_acc", metrics["acc"], prog_bar=True)

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        """The test loop's head metrics (teacher-forced batches), then the evaluation protocol (EMA weights)."""
        self.log_dict({f"test/{k}": v for k, v in self.validation.metrics().items()}, sync_dist=True)
        try:
            if self.eval_cfg.detection or self.eval_cfg.generation:
                from unigendet.evaluation.in_training import evaluate_module

                self.log_dict(evaluate_module(self), rank_zero_only=True)  # the same values on every rank
        finally:
            self.validation.leave_ema()

    @torch.no_grad()
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Head-only detection over a loader's detection batches: one record per sample."""
        if isinstance(batch, dict):
            batch = batch["det"]
        if not batch.det_labels.numel():  # a token-less batch carrying a loader worker's skip counts
            return []
        p_fake = torch.softmax(self.model(batch)["det_logits"].float(), -1)[:, 0].tolist()
        return [{"id": sid, "p_fake": p, "label": int(y)}
                for sid, p, y in zip(batch.sample_ids, p_fake, batch.det_labels.tolist(), strict=True)]

    # ----------------------------------------------------------------------------------------------
    # checkpoints and set-up
    # ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds config, counters, tokenizer and every rank's RNG states and data positions
        (:func:`unigendet.checkpoint.resume.run_state`). The EMA and a "snapshot" DIGA teacher are submodules, so
        they are in ``state_dict``; a "frozen" teacher is rebuilt from the initial weights."""
        checkpoint["unigendet"] = run_state(checkpoint, self.cfg.to_dict(), self.counters, self.data)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        counters, self._pending_rng = restore_run_state(checkpoint, self.data)
        self.counters.update(counters)

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path and getattr(self.trainer.strategy.checkpoint_io, "fallback", None) is not None:
            drop_redone_checkpoints(self.trainer)  # an automatic resume after a kill

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def setup(self, stage: str) -> None:
        from unigendet.checkpoint.lightning_io import use_atomic_checkpoint_io

        use_atomic_checkpoint_io(self.trainer.strategy)
        if stage == "test" and self.eval_cfg.generation:
            px = self.eval_cfg.gen_px
            self.cfg.check_image_size(px, px, what=f"evaluation.gen_px={px}:")
        self.configure_model()
        data = self.data
        if data is not None and data.cfg is None:
            data.connect(self.cfg, self.hparams.init_from)
