"""The training losses, reduced per token across ranks (``docs/method.md``, "Losses").

* :func:`token_mean`: a sum over this rank's tokens over the global token count / world size, so that with gradient
  averaging across ranks every token of the global batch weighs the same, however the packer filled each rank;
* :func:`detection_losses`: answer cross-entropy and the real/fake head's cross-entropy;
* :func:`generation_losses`: flow-matching MSE per latent token, plus DIGA when a teacher batch is given;
* :func:`all_finite`: every term finite on every rank, else an error or a counted skip;
* :func:`diga_loss`: 1 - cosine between the projected student states at the noisy latent tokens (after layer l) and
  a frozen teacher's states at the real image's ViT tokens, resized bilinearly to the latent grid.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from unigendet.model.packing import PackedBatch
from unigendet.model.unigendet import UniGenDet

log = logging.getLogger("unigendet.train")
TokenMean = Callable[[Tensor, int], Tensor]


def token_mean(total: Tensor, count: int, trainer=None) -> Tensor:
    """``total`` (a sum over this rank's ``count`` tokens) / (global count / world size)."""
    n = torch.tensor(float(count), device=total.device)
    world = 1
    if trainer is not None and trainer.world_size > 1:
        n = trainer.strategy.reduce(n, reduce_op="sum")
        world = trainer.world_size
    return total * world / n.clamp(min=1.0)


def detection_losses(model: UniGenDet, batch: PackedBatch, mean: TokenMean) -> dict[str, Tensor]:
    """``loss_ce`` and ``loss_det``; ``_det_logits`` (detached) for whoever wants the head's outputs."""
    out = model(batch)
    det = F.cross_entropy(out["det_logits"].float(), batch.det_labels, reduction="sum")
    return {"loss_ce": mean(out["ce"].sum(), out["ce"].numel()),
            "loss_det": mean(det, batch.det_labels.numel()),
            "_det_logits": out["det_logits"].detach()}


def generation_losses(model: UniGenDet, batch: PackedBatch, mean: TokenMean, *, teacher: UniGenDet | None = None,
                      teacher_batch: PackedBatch | None = None, diga_layer: int | None = None) -> dict[str, Tensor]:
    """``loss_mse``, and ``loss_diga`` when a teacher, its batch and a layer are given."""
    use_diga = teacher is not None and teacher_batch is not None and diga_layer is not None
    out = model(batch, hidden_layers=(diga_layer,) if use_diga else ())
    losses = {"loss_mse": mean(out["mse"].mean(-1).sum(), out["mse"].shape[0])}
    if use_diga:
        losses["loss_diga"] = diga_loss(model, teacher, batch, out["hidden"][diga_layer], teacher_batch, diga_layer,
                                        mean)
    return losses


def diga_loss(model: UniGenDet, teacher: UniGenDet, batch: PackedBatch, hidden: Tensor, teacher_batch: PackedBatch,
              layer: int, mean: TokenMean) -> Tensor:
    """1 - mean cosine(projector(student states at the noisy latents), teacher ViT states resized to that grid)."""
    with torch.no_grad():
        t_hidden = teacher.forward_hidden(teacher_batch, layer)  # (T_teacher, D)
        t_hidden = F.layer_norm(t_hidden.float(), t_hidden.shape[-1:])
    side = model.cfg.vit.max_patches_per_side
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
    student = model.project_diga(torch.cat(students))
    cos = F.cosine_similarity(student.float(), torch.cat(targets), dim=-1)
    return 1.0 - mean(cos.sum(), cos.numel())


def all_finite(losses: dict[str, Tensor], step: int, trainer, on_nan: str, counters: dict[str, int]) -> bool:
    """True when every loss term (names not starting with ``_``) is finite on every rank; the ranks must agree, since
    a rank that skipped an update alone would leave the others waiting in its collectives. Otherwise
    ``on_nan="raise"`` raises a FloatingPointError naming the step and the term, and ``"skip"`` counts the skip in
    ``counters["skipped_nan"]``, logs it and returns False."""
    names = [n for n in losses if not n.startswith("_")]
    bad = torch.stack([~torch.isfinite(losses[n].detach()) for n in names]).float()
    if trainer is not None and trainer.world_size > 1:
        bad = trainer.strategy.reduce(bad, reduce_op="sum")
    if not bad.any():
        return True
    name = names[int(bad.nonzero()[0])]
    if on_nan == "raise":
        raise FloatingPointError(f"non-finite {name} = {losses[name].item()} at step {step} (on this or another "
                                 "rank); set stage.on_nan=skip to skip such updates instead")
    counters["skipped_nan"] += 1
    log.warning("step %d: non-finite %s, update skipped (%d so far)", step, name, counters["skipped_nan"])
    return False
