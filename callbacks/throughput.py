"""Throughput: packed tokens / samples per second, step time, model TFLOP/s and MFU of every training step.

Rank 0 logs, every ``log_every_n_steps`` training steps (default: the Trainer's):

* ``perf/tokens_per_s``       - packed tokens processed per second, summed over ranks (teacher tokens included);
* ``perf/samples_per_s``      - trained samples per second, summed over ranks (teacher samples mirror gen samples
                                and are not counted again);
* ``perf/step_time_s``        - mean step time;
* ``perf/model_tflops_per_s`` and ``perf/mfu`` - only when ``peak_flops`` (per device, e.g. 989e12 for H100 bf16
                                dense) is given: analytic model FLOPs (below) / time, and that / (peak x world size).

Every rate is a moving average over the last ``window`` steps: sum(work) / sum(time). A step's time runs from
``on_train_batch_start`` to ``on_train_batch_end`` on rank 0 (``time.perf_counter``, after a CUDA synchronise at both
ends): data loading is outside it, the optimiser steps inside. The raw measurements of every step are kept in
``Throughput.history`` (one :class:`StepRecord` per step for the last ``window`` steps, summed over ranks).

Which packed batches a step processed, the step says: ``LitUniGenDet.training_step`` returns ``passes``, the batch
keys it ran forward (``det`` when the detection update ran, or in GDUF's joint update, ``gen`` when the generation
update ran, ``teacher`` forward-only through the first ``diga_layer`` decoder layers when that update had DIGA). A
module whose step returns no ``passes`` is taken to train every batch of its input. Extra passes on batches made
inside the step (fresh fakes) are not counted.

Model FLOPs (the MFU convention: what the network needs, not what the kernels do)
---------------------------------------------------------------------------------
Each token of the MoT uses ONE expert per layer (``und`` for text/ViT tokens, ``gen`` for VAE tokens); both have the
same shape, so with ``P_x`` = the parameter count of one ``decoder.layers[0].und`` (attention + MLP + norms, counted
from the module) and ``f`` = 6 for a trained pass (forward 2 + backward 4 per parameter and token) or 2 for a
forward-only pass over ``L`` decoder layers:

    F = f * [ T * L * P_x                      decoder matmuls (input embeddings excluded: a lookup)
            + n_ce  * P_lm_head                 LM head, only on the tokens with CE loss
            + n_vae * P_vae2llm + n_mse * P_llm2vae   (llm2vae only in a trained pass: the teacher has no heads)
            + n_vit * (L_vit * P_vit_block + P_patch_embed + P_connector) ]
      + 2 f * [ L * H * hd * A  +  L_vit * D_vit * sum_i n_i^2 ]      attention scores and weighted sum

``A`` is the exact number of (query, key) pairs the packed mask allows (:func:`attention_pairs`: no attention across
samples; causal text splits lower-triangular; image splits bidirectional; noise splits invisible to later splits)
and ``n_i`` the ViT tokens of image i (full attention per image). QK^T and AV cost 2 * hd FLOPs per pair and head
each, so 4 * H * hd per pair forward and 12 * H * hd forward+backward: the "12 x n_layers x dim x context length"
rule with the context of each token taken from the mask, i.e. no FLOPs counted for masked-out pairs (what a
block-sparse kernel skips; a dense-mask SDPA kernel does more hardware work than this counts). Left out as small:
norms outside the experts, the real/fake head, the DIGA projector, the timestep MLP, RoPE, softmax, the loss; the
VAE encoder (frozen, absent in the demo's pixel AE). ``f = 6`` counts weight gradients of every matmul even where a
side's parameters are frozen for that update, as MFU conventions do.

Why not Lightning's ``ThroughputMonitor``: it multiplies rank 0's batch size and length by the world size (packed
batches differ per rank), reads a fixed ``flops_per_batch`` attribute from the module (ours depend on each batch's
token mix and mask and on which updates the step runs), times the whole loop including data loading, and looks the
peak up from a device table (no CPU entry; no way to say "bf16 dense" for a given part).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import PackedBatch

#####################################################################################################
# Analytic FLOPs
#####################################################################################################


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())  # DTensor: the global count


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of the pieces one token touches, read from a built :class:`UniGenDet`."""

    expert: int  # one expert of one decoder layer: attention + MLP + its norms
    lm_head: int
    vae2llm: int
    llm2vae: int
    vit_block: int
    vit_patch_embed: int
    connector: int

    @classmethod
    def from_model(cls, model: nn.Module) -> ParamCounts:
        return cls(expert=_numel(model.decoder.layers[0].und), lm_head=_numel(model.lm_head),
                   vae2llm=_numel(model.vae2llm), llm2vae=_numel(model.llm2vae),
                   vit_block=_numel(model.vit.blocks[0]), vit_patch_embed=_numel(model.vit.patch_embed),
                   connector=_numel(model.connector))

    def active_per_token(self, cfg: UniGenDetConfig) -> int:
        """Parameters one decoder token passes through (embeddings and heads excluded): L x one expert."""
        return cfg.mot.n_layers * self.expert


def attention_pairs(sample_lens: list[int], split_lens: list[int], split_modes: list[str]) -> int:
    """(query, key) pairs the packed mask allows (the rule of ``attention.py``), without building the mask."""
    pairs, i = 0, 0
    for sample_len in sample_lens:
        visible, used = 0, 0
        while used < sample_len:
            n, mode = split_lens[i], split_modes[i]
            pairs += n * visible + (n * (n + 1) // 2 if mode == "causal" else n * n)
            if mode != "noise":
                visible += n
            used += n
            i += 1
        if used != sample_len:
            raise ValueError(f"split lengths overrun a sample of {sample_len} tokens")
    if i != len(split_lens):
        raise ValueError(f"{len(split_lens) - i} split lengths left after the last sample")
    return pairs


def batch_flops(batch: PackedBatch, cfg: UniGenDetConfig, counts: ParamCounts, *, train: bool = True,
                n_layers: int | None = None) -> int:
    """Model FLOPs of one pass over ``batch`` (module docstring): fwd+bwd when ``train``, else a forward through the
    first ``n_layers`` decoder layers without heads (the DIGA teacher)."""
    f = 6 if train else 2
    n_layers = cfg.mot.n_layers if n_layers is None else n_layers
    n_vit = batch.vit_indexes.numel()
    matmul = batch.seq_len * n_layers * counts.expert + batch.n_vae_tokens * counts.vae2llm
    matmul += n_vit * (cfg.vit.n_layers * counts.vit_block + counts.vit_patch_embed + counts.connector)
    if train:
        matmul += batch.ce_indexes.numel() * counts.lm_head + batch.mse_indexes.numel() * counts.llm2vae
    pairs = attention_pairs(batch.sample_lens, batch.split_lens, batch.split_modes)
    vit_pairs = sum(n * n for n in batch.vit_seqlens.tolist())
    attn = 2 * f * (n_layers * cfg.mot.n_heads * cfg.mot.head_dim * pairs + cfg.vit.n_layers * cfg.vit.dim * vit_pairs)
    return f * matmul + attn


#####################################################################################################
# The callback
#####################################################################################################


@dataclass
class StepRecord:
    step: int  # the module's batch counter (0-based training batches) when known, else the callback's own
    tokens: int  # summed over ranks
    samples: int
    flops: int
    time_s: float  # rank 0's wall time of the step


def processed_passes(batch, outputs=None) -> list[tuple[PackedBatch, bool, int | None]]:
    """(packed batch, trained?, decoder layers) of every pass a training step ran: as the step reports them in its
    outputs (``outputs["passes"]``: ``(batch key, trained?, layers)``, as ``LitUniGenDet.training_step`` returns);
    without that report, every PackedBatch of the batch, trained except a ``teacher`` one."""
    if isinstance(batch, PackedBatch):
        return [(batch, True, None)]
    if not isinstance(batch, Mapping):
        raise TypeError(f"Throughput expects a PackedBatch or a dict of them, got {type(batch).__name__}")
    if isinstance(outputs, Mapping) and "passes" in outputs:
        return [(batch[key], trained, layers) for key, trained, layers in outputs["passes"] if key in batch]
    return [(b, key != "teacher", None) for key, b in batch.items() if isinstance(b, PackedBatch)]


class Throughput(Callback):
    def __init__(self, peak_flops: float | None = None, window: int = 20, log_every_n_steps: int | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive, got {peak_flops}")
        self.peak_flops = peak_flops
        self.window = window
        self.log_every_n_steps = log_every_n_steps
        self.history: deque[StepRecord] = deque(maxlen=window)  # the raw measurements of the last window steps
        self.n_steps = 0
        self.counts: ParamCounts | None = None
        self._enabled = False
        self._t0: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._enabled = bool(trainer.loggers)
        if not self._enabled:
            rank_zero_warn("Throughput: the Trainer has no logger; throughput is not measured or logged")
            return
        if self.peak_flops is not None:
            self.counts = ParamCounts.from_model(pl_module.model)

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if not self._enabled:
            return
        self._sync(trainer)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if not self._enabled:
            return
        self._sync(trainer)
        elapsed = time.perf_counter() - self._t0
        step = outputs["step"] if isinstance(outputs, Mapping) and "step" in outputs else self.n_steps
        passes = processed_passes(batch, outputs)
        tokens = sum(b.seq_len for b, _, _ in passes)
        samples = sum(len(b.sample_lens) for b, train, _ in passes if train)
        flops = 0
        if self.counts is not None:
            flops = sum(batch_flops(b, pl_module.cfg, self.counts, train=train, n_layers=n) for b, train, n in passes)
        if trainer.world_size > 1:  # every rank reaches this hook: the collective is safe
            local = torch.tensor([tokens, samples, flops], dtype=torch.float64, device=trainer.strategy.root_device)
            tokens, samples, flops = (int(v) for v in trainer.strategy.reduce(local, reduce_op="sum").tolist())
        self.history.append(StepRecord(step, tokens, samples, flops, elapsed))
        self.n_steps += 1
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if trainer.is_global_zero and self.n_steps % every == 0:
            metrics = self.metrics(trainer.world_size)
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def metrics(self, world_size: int = 1) -> dict[str, float]:
        """The ``perf/*`` values over the last ``window`` recorded steps."""
        recent = list(self.history)
        seconds = sum(r.time_s for r in recent)
        out = {"perf/tokens_per_s": sum(r.tokens for r in recent) / seconds,
               "perf/samples_per_s": sum(r.samples for r in recent) / seconds,
               "perf/step_time_s": seconds / len(recent)}
        if self.peak_flops is not None:
            achieved = sum(r.flops for r in recent) / seconds
            out["perf/model_tflops_per_s"] = achieved / 1e12
            out["perf/mfu"] = achieved / (self.peak_flops * world_size)
        return out
