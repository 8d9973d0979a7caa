"""How an update is applied under manual optimisation with two optimisers (detection side, generation side).

* backward on the weighted loss, the side's gradient clipping (``joint``: the global norm of every parameter), the
  side's optimiser step (``joint``: both optimisers on the same gradients);
* ``trainer.global_step`` counts training steps: only the first optimiser step of a batch is counted, the others
  step with Lightning's counting hooks replaced (Lightning issue #17958; it re-installs them every batch);
* LR schedules follow the training steps; a side whose optimiser never stepped (a frozen side, e.g. the detector in
  the DIGA stage) keeps its schedule at the start, as torch requires.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_update(module, side: str, total: Tensor, *, counted: bool) -> list[str]:
    """Backward ``total`` and step ``side``'s optimiser (``"det"``, ``"gen"`` or ``"joint"``); ``counted``: this is
    the batch's first optimiser step. Returns the sides whose optimiser stepped."""
    opt_det, opt_gen = module.optimizers()
    opt = opt_gen if side == "gen" else opt_det
    module.model.zero_grad(set_to_none=True)
    module.manual_backward(total)
    clip = module.optim_cfg.clip_gen if side == "gen" else module.optim_cfg.clip_det
    params = module.model.parameters() if side == "joint" else (p for g in opt.param_groups for p in g["params"])
    if clip:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], clip)
    if counted:
        opt.step()
    else:
        step_uncounted(opt, module.trainer.profiler)
    if side == "joint":  # the generation side's optimiser steps on the same gradients
        step_uncounted(opt_gen, module.trainer.profiler)
        return ["det", "gen"]
    return [side]


def step_uncounted(opt, profiler) -> None:
    """Step a Lightning-wrapped optimiser without Lightning counting a global step (for the current batch)."""
    opt._on_before_step = lambda: profiler.start("optimizer_step")
    opt._on_after_step = lambda: profiler.stop("optimizer_step")
    opt.step()


def advance_schedules(schedulers, stepped: list[str]) -> None:
    """Step the (det, gen) LR schedules after a batch in which the ``stepped`` sides updated."""
    for side, sch in zip(("det", "gen"), schedulers, strict=True):
        if side in stepped or sch.last_epoch > 0:
            sch.step()
