"""LitUniGenDet: the co-evolution training loop as ONE LightningModule; GDUF, DIGA and ablations are its configs.

Features:
* manual optimisation with two optimisers: a **detection update** (answer CE + real/fake head CE) on the detector
  side (und expert, ViT, connector, heads) and a **generation update** (flow MSE + DIGA cosine) on the generator side
  (gen expert, vae2llm, llm2vae, time embedder, DIGA projector), each with its own LR schedule and clipping, in that
  order inside every training step; update ratios via ``det_every`` / ``gen_every``;
* ``joint=True`` is GDUF as the authors ran it: ONE update of all parameters on the weighted sum of all losses;
* DIGA: the student's hidden states after layer l at the noisy latent tokens, through the DIGA projector, are pulled
  (1 - cosine) toward a frozen teacher's states on the real image's ViT tokens, resized to the latent grid; the
  teacher is a snapshot of the network taken at the start (``teacher="frozen"``) or refreshed every K steps
  (``teacher="snapshot"``);
* fresh fakes: every J steps the current generator draws images that join the detection update as fakes,
  supervised with the head and the verdict sentence only;
* EMA of the weights (evaluation, export, optionally the teacher); loss reductions per token, summed across ranks;
  a non-finite loss stops with an error naming the step and the term, or (``on_nan="skip"``) skips the update,
  counted and logged;
* ``global_step`` counts training steps, not optimiser steps (Lightning issue #17958).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from unigendet.checkpoint.resume import (
    gather_per_rank,
    loader_states,
    rng_state,
    set_loader_states,
    set_rng_state,
    world,
)
from unigendet.distributed.sharding import FSDPConfig, gathered, shard, unsharded
from unigendet.evaluation.protocol import EvalConfig
from unigendet.evaluation.scores import loop_metrics
from unigendet.model.bagel_config import config_from_bagel_dir
from unigendet.model.config import ModelOverrides, PresetOrFolder, UniGenDetConfig
from unigendet.model.packing import PackedBatch, SamplePlan, TextSplit, VAESplit, ViTSplit, pack
from unigendet.model.unigendet import UniGenDet
from unigendet.training.ema import EMA
from unigendet.training.optim import OptimConfig, build_optimizer, build_scheduler, partition

log = logging.getLogger("unigendet.train")

try:  # as a command-line type, a preset-name typo fails while LightningCLI parses the config
    from jsonargparse.typing import register_type
except ImportError:  # pragma: no cover - jsonargparse comes with lightning's CLI extra
    pass
else:
    register_type(PresetOrFolder, serializer=str, deserializer=PresetOrFolder)

#####################################################################################################
# Configuration
#####################################################################################################


@dataclass
class LossWeights:
    ce: float = 1.0
    """Answer cross-entropy (detection update)."""
    det: float = 0.2
    """Real/fake head cross-entropy (detection update); the released code's 0.2."""
    mse: float = 1.0
    """Flow-matching MSE (generation update)."""
    diga: float = 0.5
    """DIGA cosine loss (generation update)."""


@dataclass
class Schedule:
    joint: bool = False
    """GDUF as released: one update of all parameters on the weighted sum of all losses (``optim.clip_det`` clips
    the global norm)."""
    train_det: bool = True
    """Run detection updates (False: the detector side is frozen, e.g. the DIGA stage)."""
    train_gen: bool = True
    """Run generation updates."""
    det_every: int = 1
    """A detection update every N steps (ratios N det : M gen; one of the two must be 1)."""
    gen_every: int = 1
    """A generation update every M steps."""
    diga: bool = False
    """Add the DIGA loss to the generation update (needs teacher batches from the data module)."""
    diga_layer: int | None = None
    """Layer whose output DIGA aligns (default: the model config's ``head.diga_layer``)."""
    teacher: str = "frozen"
    """DIGA teacher: "frozen" (snapshot at the start) or "snapshot" (refreshed every ``teacher_refresh`` steps)."""
    teacher_refresh: int = 0
    teacher_from_ema: bool = False
    """Take the teacher snapshot from the EMA weights."""
    fresh_fakes_every: int = 0
    """Every J steps generate ``fresh_fakes`` images with the current generator and feed them as fakes (0: off)."""
    fresh_fakes: int = 2
    fresh_fake_px: int = 64
    fresh_fake_steps: int = 10
    on_nan: str = "raise"
    """Non-finite loss: "raise" (an error naming step and term) or "skip" (skip the update, counted)."""

    def __post_init__(self) -> None:
        if min(self.det_every, self.gen_every) != 1 or max(self.det_every, self.gen_every) < 1:
            raise ValueError("update ratios: one of det_every / gen_every must be 1, the other >= 1")
        if self.teacher not in ("frozen", "snapshot"):
            raise ValueError(f"teacher must be 'frozen' or 'snapshot', got {self.teacher!r}")
        if self.on_nan not in ("raise", "skip"):
            raise ValueError(f"on_nan must be 'raise' or 'skip', got {self.on_nan!r}")
        if self.teacher == "snapshot" and self.teacher_refresh < 1:
            raise ValueError("teacher='snapshot' needs teacher_refresh >= 1")


#####################################################################################################
# The module
#####################################################################################################


class LitUniGenDet(L.LightningModule):
    def __init__(self, model: PresetOrFolder | None = None, model_overrides: ModelOverrides | None = None,
                 init_from: str | None = None, init_ae_from: str | None = None,
                 loss: LossWeights | None = None, schedule: Schedule | None = None, optim: OptimConfig | None = None,
                 freeze: list[str] | None = None, ema_decay: float | None = 0.999, attn_backend: str = "auto",
                 seed: int = 0, val_samples: int = 0, val_sample_px: int = 64, val_sample_steps: int = 10,
                 fsdp: FSDPConfig | None = None, rank_seeds: bool = True,
                 evaluation: EvalConfig | None = None) -> None:
        """
        Args:
            model: a preset name (``tiny``, ``demo``, ``debug``, ``bagel-7b-mot``) or a BAGEL / UniGenDet folder;
                None: the architecture of the ``init_from`` folder (fine-tuning BAGEL needs only ``init_from``).
            model_overrides: config overrides for a preset (:class:`unigendet.model.config.ModelOverrides`, or its
                nested dict from Python), e.g. ``{"mot": {"n_layers": 4}}``.
            init_from: weights to start from: a BAGEL / UniGenDet folder (random init when None).
            init_ae_from: a trained autoencoder file (``unigendet train-ae``), loaded into the frozen VAE after
                ``init_from`` (the ``demo`` preset's small learned AE; without it that AE is random).
            freeze: top-level parts to freeze (``vit``, ``embed``, ...); the VAE is always frozen.
            ema_decay: EMA of the weights (None: off).
            val_samples: after each validation, generate this many images (EMA weights, fixed prompts and seeds,
                so runs and steps are comparable) into ``<root>/samples/step_<k>.png`` and to the logger.
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
        self.loss_w = loss or LossWeights()
        self.sched = schedule or Schedule()
        self.optim_cfg = optim or OptimConfig()
        self.fsdp_cfg = fsdp or FSDPConfig()
        self.eval_cfg = evaluation or EvalConfig()
        if model is None and not init_from:
            raise ValueError("set model.model (a preset: tiny, demo, debug, bagel-7b-mot) or model.init_from "
                             "(a BAGEL / UniGenDet model folder, whose architecture is then used)")
        if init_ae_from and not Path(init_ae_from).is_file():
            raise ValueError(f"model.init_ae_from: no autoencoder file {init_ae_from} (train it: unigendet train-ae "
                             f"--corpus <corpus folder> --out {init_ae_from})")
        model = None if model is None else str(PresetOrFolder(model))
        source = model if model is not None else str(PresetOrFolder(init_from))
        if not isinstance(model_overrides, ModelOverrides):
            model_overrides = ModelOverrides.from_dict(model_overrides)
        overrides = model_overrides.to_dict()
        self.save_hyperparameters({"model": model, "model_overrides": overrides, "init_from": init_from,
                                   "init_ae_from": init_ae_from,
                                   "loss": dataclasses.asdict(self.loss_w), "schedule": dataclasses.asdict(self.sched),
                                   "optim": dataclasses.asdict(self.optim_cfg), "freeze": list(freeze or []),
                                   "ema_decay": ema_decay, "attn_backend": attn_backend, "seed": seed,
                                   "val_samples": val_samples, "val_sample_px": val_sample_px,
                                   "val_sample_steps": val_sample_steps,
                                   "fsdp": dataclasses.asdict(self.fsdp_cfg), "rank_seeds": rank_seeds})
        # ``evaluation`` is deliberately not a hyperparameter: LightningCLI's ``test --ckpt_path`` applies the
        # checkpoint's hyperparameters OVER the command line, which would silently replace the evaluation settings
        # given for this test run with the defaults the training run saved
        if Path(source).is_dir():
            self.cfg = config_from_bagel_dir(source).with_overrides(overrides)
        else:
            self.cfg = UniGenDetConfig.from_name(source, **overrides)
        # settings that generate images are checked now, not when training first uses them
        if self.sched.fresh_fakes_every:
            px = self.sched.fresh_fake_px
            self.cfg.check_image_size(px, px, what=f"schedule.fresh_fake_px={px}:")
        if val_samples:
            self.cfg.check_image_size(val_sample_px, val_sample_px, what=f"val_sample_px={val_sample_px}:")
        self.model: UniGenDet | None = None
        # the "frozen" teacher sits in a list, out of the module tree and the checkpoints: it is rebuilt from the
        # initial weights by configure_model; a "snapshot" teacher is the submodule ``teacher_net`` (checkpointed)
        self._teacher: list[UniGenDet] = []
        self.teacher_net: UniGenDet | None = None
        self._pending_rng: dict | None = None
        self.ema: EMA | None = None
        self.counters = {"batches": 0, "skipped_nan": 0, "fresh_fakes_seen": 0}
        self._fresh: list[SamplePlan] = []
        self._val: dict[str, list] = {}

    # ----------------------------------------------------------------------------------------------
    # building
    # ----------------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        layer = self.sched.diga_layer or self.cfg.head.diga_layer
        if self.sched.diga and not 1 <= layer <= self.cfg.mot.n_layers:
            raise ValueError(f"diga_layer {layer} is outside the model's 1..{self.cfg.mot.n_layers} decoder layers")
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        # sharded and initialised from a folder: build on the meta device, shard, allocate only this rank's shards
        # and stream the weights in one tensor at a time (no rank ever holds the whole network)
        per_shard = mesh is not None and bool(self.hparams.init_from)
        torch.manual_seed(self.hparams.seed)
        if per_shard:
            with torch.device("meta"):
                model = UniGenDet(self.cfg)
        else:
            model = UniGenDet(self.cfg)
            model.init_weights()
            if self.hparams.init_from:
                from unigendet.checkpoint.folders import load_weights

                report = load_weights(model, self.hparams.init_from)
                log.info("initialised from %s: %s", self.hparams.init_from, report)
            if self.hparams.get("init_ae_from"):
                from unigendet.training.autoencoder import load_autoencoder

                report = load_autoencoder(model.vae, self.hparams.init_ae_from)
                log.info("autoencoder from %s (trained: %s)", self.hparams.init_ae_from, report)
            elif self.cfg.vae.kind == "conv" and not self.hparams.init_from:
                log.warning("the %s autoencoder is random: pass --model.init_ae_from=<file from unigendet train-ae>",
                            self.cfg.vae.kind)
        model.attn_backend = self.hparams.attn_backend
        for part in self.hparams.freeze:
            if not hasattr(model, part):
                raise ValueError(f"cannot freeze unknown part {part!r}")
            getattr(model, part).requires_grad_(False)
        if self.optim_cfg.shared == "frozen":
            model.embed.requires_grad_(False)
            model.lm_head.requires_grad_(False)
        sides = partition(model, self.optim_cfg.shared)
        if not self.sched.train_det:
            for _, p in sides["det"]:
                p.requires_grad_(False)
        if not self.sched.train_gen:
            for _, p in sides["gen"]:
                p.requires_grad_(False)
        teacher = None
        if self.sched.diga:
            if per_shard:
                with torch.device("meta"):
                    teacher = UniGenDet(self.cfg)
                teacher.attn_backend = self.hparams.attn_backend
            else:
                teacher = copy.deepcopy(model)
            teacher.requires_grad_(False).eval()
        if mesh is not None:  # FSDP2Strategy / ModelParallelStrategy: shard, the teacher alike
            shard(model, mesh, self.fsdp_cfg)
            if teacher is not None:
                shard(teacher, mesh, self.fsdp_cfg)
        if per_shard:
            from unigendet.checkpoint.folders import load_weights

            device = self.trainer.strategy.root_device
            model.to_empty(device=device)
            if teacher is not None:
                teacher.to_empty(device=device)  # filled by refresh_teacher below
            torch.manual_seed(self.hparams.seed)
            report = load_weights(model, self.hparams.init_from, device=str(device))
            log.info("initialised from %s, shard by shard: %s", self.hparams.init_from, report)
        self.model = model
        if self.hparams.ema_decay is not None:
            self.ema = EMA(model, decay=self.hparams.ema_decay)
        if teacher is not None:
            if self.sched.teacher == "snapshot":
                self.teacher_net = teacher  # refreshed during training: checkpointed, so a resume continues with it
            else:
                self._teacher = [teacher]
            self.refresh_teacher()
        # training's random stream (flow noise, posterior samples) starts from the seed (+ rank), whatever the
        # initialisation drew (a folder loaded whole or shard by shard, a random init)
        rank = self.trainer.global_rank if self._trainer is not None and self.hparams.rank_seeds else 0
        torch.manual_seed(self.hparams.seed + rank)

    @torch.no_grad()
    def refresh_teacher(self) -> None:
        """Copy the current network's weights (or their EMA) into the DIGA teacher, in place (shard by shard
        under FSDP2: student and teacher are sharded alike)."""
        teacher = self.teacher
        src = dict(self.model.named_parameters())
        for name, p in teacher.named_parameters():
            p.copy_(src[name].detach())
        if self.sched.teacher_from_ema and self.ema is not None:
            self.ema.copy_to(teacher)

    @property
    def teacher(self) -> UniGenDet | None:
        teacher = self.teacher_net if self.teacher_net is not None else (self._teacher[0] if self._teacher else None)
        if teacher is None:
            return None
        if teacher.training:  # Lightning puts every submodule in train mode at the start of fit
            teacher.eval()
        if teacher.embed.weight.device != self.model.embed.weight.device:
            teacher.to(self.model.embed.weight.device)
        return teacher

    def configure_optimizers(self):
        sides = partition(self.model, self.optim_cfg.shared)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if total is None:
            raise ValueError("set trainer.max_steps: the LR schedules are defined over a number of steps")
        opts, scheds = [], []
        for side, lr in (("det", self.optim_cfg.lr_det), ("gen", self.optim_cfg.lr_gen)):
            params = [(n, p) for n, p in sides[side] if p.requires_grad]
            if not params:  # a frozen side still gets an (empty-ish) optimiser so indices stay stable
                params = [(f"_{side}_placeholder", torch.nn.Parameter(torch.zeros(1), requires_grad=False))]
            opt = build_optimizer(params, lr, self.optim_cfg)
            opts.append(opt)
            scheds.append(build_scheduler(opt, self.optim_cfg, total,
                                          warn=not scheds and self.trainer.is_global_zero))
        return opts, scheds

    # ----------------------------------------------------------------------------------------------
    # losses
    # ----------------------------------------------------------------------------------------------
    def _token_mean(self, total: Tensor, count: int) -> Tensor:
        """Sum over this rank / (global count / world size): with gradient averaging across ranks this is the mean
        over every token of the global batch, whatever each rank holds."""
        n = torch.tensor(float(count), device=total.device)
        world = 1
        if self.trainer is not None and self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
            world = self.trainer.world_size
        return total * world / n.clamp(min=1.0)

    def detection_losses(self, batch: PackedBatch) -> dict[str, Tensor]:
        out = self.model(batch)
        return {"loss_ce": self._token_mean(out["ce"].sum(), out["ce"].numel()),
                "loss_det": self._token_mean(F.cross_entropy(out["det_logits"].float(), batch.det_labels,
                                                             reduction="sum"), batch.det_labels.numel()),
                "_det_logits": out["det_logits"].detach()}

    def generation_losses(self, batch: PackedBatch, teacher_batch: PackedBatch | None = None) -> dict[str, Tensor]:
        layer = self.sched.diga_layer or self.cfg.head.diga_layer
        use_diga = self.sched.diga and teacher_batch is not None
        out = self.model(batch, hidden_layers=(layer,) if use_diga else ())
        losses = {"loss_mse": self._token_mean(out["mse"].mean(-1).sum(), out["mse"].shape[0])}
        if use_diga:
            losses["loss_diga"] = self.diga_loss(batch, out["hidden"][layer], teacher_batch, layer)
        return losses

    def diga_loss(self, batch: PackedBatch, hidden: Tensor, teacher_batch: PackedBatch, layer: int) -> Tensor:
        """1 - mean cosine(projector(student states at noisy latents), teacher ViT states resized to that grid)."""
        with torch.no_grad():
            t_hidden = self.teacher.forward_hidden(teacher_batch, layer)  # (T_teacher, D)
            t_hidden = F.layer_norm(t_hidden.float(), t_hidden.shape[-1:])
        side = self.cfg.vit.max_patches_per_side
        t_rows = teacher_batch.vit_indexes.split(teacher_batch.vit_seqlens.tolist())
        t_pos = teacher_batch.vit_position_ids.split(teacher_batch.vit_seqlens.tolist())
        noisy = batch.vae_timesteps.isfinite().split((batch.vae_grids[:, 0] * batch.vae_grids[:, 1]).tolist())
        s_rows = batch.vae_indexes.split([int(n.numel()) for n in noisy])
        students, targets = [], []
        for i, (rows, pos, grid) in enumerate(zip(t_rows, t_pos, batch.vae_grids.tolist(), strict=True)):
            h, w = int(pos.max()) // side + 1, int(pos.max() % side) + 1
            tv = t_hidden[rows].reshape(h, w, -1).permute(2, 0, 1)[None]  # (1, D, h, w) on the ViT grid
            tv = F.interpolate(tv, size=tuple(grid), mode="bilinear", align_corners=False)[0]
            targets.append(tv.flatten(1).T)  # (gh*gw, D)
            students.append(hidden[s_rows[i]])
        student = self.model.project_diga(torch.cat(students))
        cos = F.cosine_similarity(student.float(), torch.cat(targets), dim=-1)
        return 1.0 - self._token_mean(cos.sum(), cos.numel())

    # ----------------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------------
    def _check(self, losses: dict[str, Tensor], step: int) -> bool:
        """True when every loss term is finite on every rank (the ranks must agree: a rank that skipped an update
        alone would leave the others waiting in its collectives)."""
        names = [n for n in losses if not n.startswith("_")]
        bad = torch.stack([~torch.isfinite(losses[n].detach()) for n in names]).float()
        if self.trainer is not None and self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if not bad.any():
            return True
        name = names[int(bad.nonzero()[0])]
        if self.sched.on_nan == "raise":
            raise FloatingPointError(f"non-finite {name} = {losses[name].item()} at step {step} (on this or another "
                                     "rank); set schedule.on_nan=skip to skip such updates instead")
        self.counters["skipped_nan"] += 1
        log.warning("step %d: non-finite %s, update skipped (%d so far)", step, name, self.counters["skipped_nan"])
        return False

    def _update(self, opt, side: str, loss: Tensor, first: bool) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        self.model.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        clip = self.optim_cfg.clip_det if side in ("det", "joint") else self.optim_cfg.clip_gen
        if side == "joint":
            params = [p for p in self.model.parameters() if p.requires_grad]
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if not first:
            self._uncounted(opt)
        opt.step()

    def _uncounted(self, opt) -> None:
        """Lightning counts optimiser steps as global steps (#17958): only the first step of a batch may count.
        Lightning re-installs these hooks every batch, so this lasts for the current batch only."""
        prof = self.trainer.profiler
        opt._on_before_step = lambda: prof.start("optimizer_step")
        opt._on_after_step = lambda: prof.stop("optimizer_step")

    def training_step(self, batch: dict[str, PackedBatch], batch_idx: int) -> None:
        step = self.counters["batches"]
        self.counters["batches"] += 1
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "record_train_batch"):
            dm.record_train_batch(batch)
        opt_det, opt_gen = self.optimizers()
        sch_det, sch_gen = self.lr_schedulers()
        w, s = self.loss_w, self.sched
        logs: dict[str, float] = {}
        if s.fresh_fakes_every and step % s.fresh_fakes_every == 0 and step > 0:
            self._make_fresh_fakes()
        do_det = s.train_det and "det" in batch and step % s.det_every == 0
        do_gen = s.train_gen and "gen" in batch and step % s.gen_every == 0
        stepped: set[str] = set()  # the sides whose optimiser stepped in this batch
        if s.joint:
            losses = {**self.detection_losses(batch["det"]), **self.generation_losses(batch["gen"])}
            total = w.ce * losses["loss_ce"] + w.det * losses["loss_det"] + w.mse * losses["loss_mse"]
            if self._check(losses, step):
                self._update(opt_det, "joint", total, first=True)
                self._update_step_only(opt_gen)
                stepped |= {"det", "gen"}
            logs.update({f"train/{k}": v.item() for k, v in losses.items() if not k.startswith("_")})
        else:
            if do_det:
                losses = self.detection_losses(batch["det"])
                total = w.ce * losses["loss_ce"] + w.det * losses["loss_det"]
                fresh = self._fresh_batch()
                if fresh is not None:
                    f = self.detection_losses(fresh)
                    losses["loss_fresh"] = w.ce * f["loss_ce"] + w.det * f["loss_det"]
                    total = total + losses["loss_fresh"]
                if self._check(losses, step):
                    self._update(opt_det, "det", total, first=not stepped)
                    stepped.add("det")
                logs.update({f"train/{k}": v.item() for k, v in losses.items() if not k.startswith("_")})
            if do_gen:
                losses = self.generation_losses(batch["gen"], batch.get("teacher"))
                total = w.mse * losses["loss_mse"] + w.diga * losses.get("loss_diga", 0.0)
                if self._check(losses, step):
                    self._update(opt_gen, "gen", total, first=not stepped)
                    stepped.add("gen")
                logs.update({f"train/{k}": v.item() for k, v in losses.items()})
        if stepped:
            # each side's LR schedule follows the training steps; a side whose optimiser has never stepped (a frozen
            # side, e.g. the detector in the DIGA stage) keeps its schedule at the start, as torch requires
            for side, sch in (("det", sch_det), ("gen", sch_gen)):
                if side in stepped or sch.last_epoch > 0:
                    sch.step()
            if self.ema is not None:
                self.ema.update(self.model)
        if s.diga and s.teacher == "snapshot" and step > 0 and step % s.teacher_refresh == 0:
            self.refresh_teacher()
        logs.update({"train/lr_det": sch_det.get_last_lr()[0], "train/lr_gen": sch_gen.get_last_lr()[0],
                     "train/skipped_nan": self.counters["skipped_nan"],
                     "train/fresh_fakes_seen": self.counters["fresh_fakes_seen"]})
        if dm is not None and hasattr(dm, "skip_metrics"):
            logs.update(dm.skip_metrics(batch))
        self.log_dict(logs, prog_bar=False, on_step=True, batch_size=1)
        if "train/loss_det" in logs:
            self.log("det", logs["train/loss_det"], prog_bar=True, batch_size=1)
        if "train/loss_mse" in logs:
            self.log("mse", logs["train/loss_mse"], prog_bar=True, batch_size=1)
        return logs  # this step's values (callbacks get them as ``outputs``; callback_metrics keep stale ones)

    def _update_step_only(self, opt) -> None:
        """Step a second optimiser on gradients already computed (joint mode), without counting a global step."""
        self._uncounted(opt)
        opt.step()

    # ----------------------------------------------------------------------------------------------
    # fresh fakes
    # ----------------------------------------------------------------------------------------------
    def _make_fresh_fakes(self) -> None:
        dm = self.trainer.datamodule
        gen_dm = getattr(dm, "gen_dm", dm)
        records = gen_dm.split_records("train")
        k = self.counters["batches"]
        prompts = [records[(k * 7919 + i * 104729) % len(records)].prompt for i in range(self.sched.fresh_fakes)]
        px = self.sched.fresh_fake_px
        images = self.generate_images(prompts, height=px, width=px, steps=self.sched.fresh_fake_steps, seed=k)
        verdict = dm.tok.encode("This is a fake image.")
        question = dm.tok.encode(getattr(dm, "prompt", None) or "Does the image looks real/fake?")
        vit_tf, vae_tf = dm.vit_tf(), dm.vae_tf()
        for img in images:
            splits = [VAESplit(image=vae_tf(img))] if getattr(dm, "with_vae", True) else []
            self._fresh.append(SamplePlan([*splits, ViTSplit(vit_tf(img)), TextSplit(question),
                                           TextSplit(verdict, loss=True)], label=0, sample_id="fresh_fake"))

    def _fresh_batch(self) -> PackedBatch | None:
        if not self._fresh:
            return None
        plans, self._fresh = self._fresh, []
        self.counters["fresh_fakes_seen"] += len(plans)
        return pack(plans, self.cfg).to(self.device)

    @torch.no_grad()
    def generate_images(self, prompts: list[str], *, height: int, width: int, steps: int = 25, seed: int = 0,
                        cfg_scale: float | None = None, use_ema: bool = False):
        """Images from the current generator (or its EMA), for fresh fakes, validation samples and callbacks."""
        from unigendet.inference import Engine

        was_training = self.model.training
        ctx = self.ema.swap(self.model) if (use_ema and self.ema is not None) else contextlib.nullcontext()
        with ctx, unsharded(self.model):
            engine = Engine(self.model, self.trainer.datamodule.tok)
            images = engine.generate(prompts, height=height, width=width, steps=steps, seed=seed,
                                     cfg_scale=cfg_scale)
        self.model.train(was_training)
        return images

    @torch.no_grad()
    def detect_images(self, images: list, *, use_ema: bool = False, batch_size: int = 8) -> Tensor:
        """p(fake) from the real/fake head (no explanation) for PIL images, as the detection data presents them
        (the data module's transforms, question and VAE split): (N,) on the CPU."""
        from unigendet.inference import DEFAULT_PROMPT, Engine

        dm = self.trainer.datamodule
        was_training = self.model.training
        ctx = self.ema.swap(self.model) if (use_ema and self.ema is not None) else contextlib.nullcontext()
        out = []
        try:
            with ctx, unsharded(self.model):
                engine = Engine(self.model, dm.tok)
                if hasattr(dm, "with_vae"):  # a detection side: its resolutions, question and SMSA setting
                    engine.vit_tf, engine.vae_tf = dm.vit_tf(), dm.vae_tf()
                prompt = getattr(dm, "prompt", None) or DEFAULT_PROMPT
                for i in range(0, len(images), batch_size):
                    out += [r.p_fake for r in engine.detect(images[i: i + batch_size], prompt=prompt, explain=False,
                                                            with_vae=getattr(dm, "with_vae", True))]
        finally:
            self.model.train(was_training)
        return torch.tensor(out)

    # ----------------------------------------------------------------------------------------------
    # validation / test
    # ----------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {"p_fake": [], "label": [], "ce": [], "mse": []}
        self._ema_ctx = self.ema.swap(self.model) if self.ema is not None else None
        if self._ema_ctx is not None:
            self._ema_ctx.__enter__()

    def validation_step(self, batch: PackedBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if isinstance(batch, dict):
            batch = batch.get("det") or batch.get("gen")
        if batch.det_labels.numel():
            out = self.model(batch)
            self._val["p_fake"].append(torch.softmax(out["det_logits"].float(), -1)[:, 0].cpu())
            self._val["label"].append(batch.det_labels.cpu())
            self._val["ce"].append(out["ce"].detach().cpu())
        if batch.mse_indexes.numel():
            g = torch.Generator(device="cpu").manual_seed(batch_idx)  # the same noise every validation
            noise = torch.randn(batch.n_vae_tokens, self.cfg.latent_token_dim, generator=g).to(self.device)
            out = self.model(batch, noise=noise)
            self._val["mse"].append(out["mse"].mean(-1).detach().cpu())

    def _leave_ema(self) -> None:
        if self._ema_ctx is not None:
            self._ema_ctx.__exit__(None, None, None)
            self._ema_ctx = None

    def on_validation_epoch_end(self) -> None:
        self._leave_ema()
        metrics = loop_metrics(self._val)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()}, prog_bar=False, sync_dist=True)
        if "acc" in metrics:
            self.log("val_acc", metrics["acc"], prog_bar=True)
        if self.hparams.val_samples and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.save_val_samples()

    def save_val_samples(self) -> Path:
        """A grid of images for fixed held-out (else training) captions and seeds, from the EMA weights, each
        caption under its image."""
        from unigendet.evaluation.plots import caption_grid

        dm = self.trainer.datamodule
        gen_dm = getattr(dm, "gen_dm", dm)
        split = "val" if getattr(gen_dm, "val", None) else "train"
        records = gen_dm.split_records(split)[: self.hparams.val_samples]
        px = self.hparams.val_sample_px
        images = self.generate_images([r.prompt for r in records], height=px, width=px,
                                      steps=self.hparams.val_sample_steps, seed=0, use_ema=True)
        grid = caption_grid(images, [r.prompt for r in records], n_cols=len(images))
        path = Path(self.trainer.default_root_dir) / "samples" / f"step_{self.global_step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        if self.logger is not None and hasattr(self.logger, "log_image"):
            self.logger.log_image(key="val/samples", images=images, caption=[r.prompt for r in records],
                                  step=self.global_step)
        return path

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step

    def on_test_epoch_end(self) -> None:
        """The test loop's head metrics (teacher-forced batches), then the evaluation protocol (EMA weights)."""
        self.log_dict({f"test/{k}": v for k, v in loop_metrics(self._val).items()}, sync_dist=True)
        try:
            if self.eval_cfg.detection or self.eval_cfg.generation:
                self.log_dict(self.evaluate_protocol(), rank_zero_only=True)  # the same values on every rank
        finally:
            self._leave_ema()

    def evaluate_protocol(self) -> dict[str, float]:
        """:func:`unigendet.evaluation.protocol.run_protocol` on the data module's test split; rank 0 writes the report
        (JSON, JSONL rows, Markdown, generated PNGs) and, with a W&B logger, a table of the rows."""
        from unigendet.evaluation.protocol import flat_metrics, report_dir, run_protocol, write_report
        from unigendet.inference import Engine

        dm = self.trainer.datamodule
        out_dir = report_dir(self.eval_cfg, self.trainer)  # a broadcast: every rank asks
        was_training = self.model.training
        try:
            with gathered(self.model):  # ranks evaluate different images: no collectives inside forwards
                engine = Engine(self.model, dm.tok)
                results = run_protocol(engine, dm, self.eval_cfg, out_dir=out_dir,
                                       detect_images=lambda images: self.detect_images(images))
        finally:
            self.model.train(was_training)
        if self.trainer.is_global_zero:
            out = write_report(results, out_dir)
            log.info("evaluation report: %s", out / "report.md")
            rows = results["_rows"]
            for lg in self.loggers:
                if rows and hasattr(lg, "log_table"):
                    columns = [k for k in rows[0] if k != "index"]
                    lg.log_table(key="test/detections", columns=columns, data=[[r[k] for k in columns] for r in rows])
        return flat_metrics(results)

    @torch.no_grad()
    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """Head-only detection over a loader's detection batches: one record per sample."""
        if isinstance(batch, dict):
            batch = batch["det"]
        if not batch.det_labels.numel():  # a token-less batch carrying a loader worker's skip counts
            return []
        out = self.model(batch)
        p_fake = torch.softmax(out["det_logits"].float(), -1)[:, 0].tolist()
        return [{"id": sid, "p_fake": p, "label": int(y)}
                for sid, p, y in zip(batch.sample_ids, p_fake, batch.det_labels.tolist(), strict=True)]

    # ----------------------------------------------------------------------------------------------
    # checkpoints
    # ----------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the config, counters, tokenizer and, gathered from every rank, each rank's RNG states and data
        positions (Lightning keeps rank 0's only). The EMA and a "snapshot" DIGA teacher are submodules, so they
        are in ``state_dict``; a "frozen" teacher is rebuilt from the initial weights."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        progress = dm.train_progress() if dm is not None and hasattr(dm, "train_progress") else None
        checkpoint["unigendet"] = {"config": self.cfg.to_dict(), "counters": dict(self.counters),
                                   "ranks": gather_per_rank({"rng": rng_state(), "loaders": loader_states(checkpoint),
                                                             "progress": progress})}
        if dm is not None and getattr(dm, "tok", None) is not None:
            checkpoint["unigendet"]["tokenizer_json"] = dm.tok.path.read_text()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.configure_model()
        extra = checkpoint.get("unigendet", {})
        self._check_tokenizer(extra.get("tokenizer_json"))
        self.counters.update(extra.get("counters", {}))
        ranks = extra.get("ranks") or []
        rank, size = world()
        if len(ranks) == size:
            set_loader_states(checkpoint, ranks[rank]["loaders"])
            dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            if dm is not None and hasattr(dm, "set_train_progress"):
                dm.set_train_progress(ranks[rank].get("progress"))
            self._pending_rng = ranks[rank]["rng"]  # set when training resumes: loader setup draws from it first
        elif ranks:
            log.warning("checkpoint written by %d processes, resumed by %d: weights and optimiser states are "
                        "resharded exactly; RNG states are not restored and each data stream restarts its record "
                        "epoch", len(ranks), size)

    def _check_tokenizer(self, saved: str | None) -> None:
        """A checkpoint's token ids mean nothing under another tokenizer (the demo corpus trains its own BPE, so two
        seeds give two vocabularies): refuse to resume or evaluate with a data tokenizer that differs from the one
        the checkpoint was trained with."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        tok = getattr(dm, "tok", None)
        if saved is None or tok is None or json.loads(tok.path.read_text()) == json.loads(saved):
            return
        raise ValueError(f"the data's tokenizer ({tok.path}) is not the one this checkpoint was trained with, so its "
                         "token ids would be misread; pass --data.tokenizer=<the tokenizer.json of the training data> "
                         "(for `make demo`: demo-run/corpus/tokenizer.json)")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def setup(self, stage: str) -> None:
        from lightning.pytorch.plugins.io import TorchCheckpointIO

        from unigendet.checkpoint.lightning_io import AtomicCheckpointIO

        strategy = self.trainer.strategy
        if type(strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make checkpoint writes atomic
            strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "test" and self.eval_cfg.generation:
            px = self.eval_cfg.gen_px
            self.cfg.check_image_size(px, px, what=f"evaluation.gen_px={px}:")
        self.configure_model()
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "connect") and getattr(dm, "cfg", None) is None:
            dm.connect(self.cfg, self.hparams.init_from)


