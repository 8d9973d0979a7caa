"""Optimisers and learning-rate schedules for the two sides of the co-evolving model.

Features:
* ``partition(model, shared)`` splits the trainable parameters into the detector side (und expert, ViT, connector,
  detection head) and the generator side (gen expert, latent projections, timestep embedder, DIGA projector); the
  token embedding and LM head go to the side named by ``shared`` (or to neither when ``"frozen"``). A trainable
  parameter that matches neither side raises, so a newly added module can never be left silently untrained, and
  no parameter is ever in both sides. Wrapper prefixes (``torch.compile``, activation checkpointing, FSDP1) are
  ignored when matching;
* ``param_groups`` gives the usual two AdamW groups: weight decay on >=2-D weights only, none on biases, norms and
  embedding tables;
* ``lr_lambda`` / ``build_scheduler``: linear warm-up then constant, cosine or linear decay to ``min_lr_ratio``;
  the warm-up is capped at half the run (``effective_warmup``), with a warning, because the authors' release warmed
  up for 2000 steps in runs of about 1000 steps, so its learning rate never reached its peak.

Each side gets its own ``torch.optim.AdamW`` (``build_optimizer``) with its own learning rate and clip norm
(``OptimConfig.lr_det``/``lr_gen``, ``clip_det``/``clip_gen``), so one side's step never moves the other's weights.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger("unigendet.training.optim")

SIDES = ("det", "gen")
SHARED_OWNERS = ("det", "gen", "frozen")
SCHEDULES = ("constant", "cosine", "linear")

#####################################################################################################
# Config
#####################################################################################################


@dataclass
class OptimConfig:
    """AdamW and learning-rate schedule settings, one learning rate and clip norm per side."""

    lr_det: float = 1e-4
    """Peak learning rate of the detector side."""
    lr_gen: float = 1e-4
    """Peak learning rate of the generator side."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied to >=2-D weights only (see ``param_groups``)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    warmup_steps: int = 0
    """Linear warm-up steps; capped at half the run (``effective_warmup``)."""
    schedule: str = "cosine"
    """Decay after the warm-up: ``"constant"``, ``"cosine"`` or ``"linear"``."""
    min_lr_ratio: float = 0.1
    """Learning rate at the last step, as a fraction of the peak (cosine and linear only)."""
    clip_det: float | None = 1.0
    """Gradient-norm clip of the detector side; None disables clipping."""
    clip_gen: float | None = 1.0
    """Gradient-norm clip of the generator side; None disables clipping."""
    shared: str = "det"
    """Which side trains the shared token embedding and LM head: ``"det"``, ``"gen"`` or ``"frozen"``."""

    def __post_init__(self) -> None:
        for name in ("lr_det", "lr_gen"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        for name in ("clip_det", "clip_gen"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be None or a positive finite number, got {value!r}")
        if self.shared not in SHARED_OWNERS:
            raise ValueError(f"shared must be one of {SHARED_OWNERS}, got {self.shared!r}")

    def lr(self, side: str) -> float:
        """The peak learning rate of ``side`` ("det" | "gen")."""
        _check_side(side)
        return self.lr_det if side == "det" else self.lr_gen

    def clip(self, side: str) -> float | None:
        """The gradient-norm clip of ``side`` ("det" | "gen"), None when disabled."""
        _check_side(side)
        return self.clip_det if side == "det" else self.clip_gen


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")


#####################################################################################################
# Parameter partition
#####################################################################################################

# Patterns over parameter names of ``UniGenDet`` (anchored at the start, wrapper prefixes removed).
_SIDE_PATTERNS = {
    "det": re.compile(r"(decoder\.layers\.\d+\.und|decoder\.norm_und|vit|connector|det_head)\."),
    "gen": re.compile(r"(decoder\.layers\.\d+\.gen|decoder\.norm_gen|vae2llm|llm2vae|time_embed|diga_proj)\."),
}
_SHARED_PATTERN = re.compile(r"(embed|lm_head)\.")
# Path components added by torch.compile, activation checkpointing and FSDP1 wrappers.
_WRAPPERS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")


def _plain_name(name: str) -> str:
    """The parameter name without wrapper components, e.g. ``_orig_mod.vit.x`` -> ``vit.x``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPERS)


def partition(model: nn.Module, shared: str = "det") -> dict[str, list[tuple[str, nn.Parameter]]]:
    """The trainable (``requires_grad``) parameters of each side, in ``named_parameters`` order.

    Args:
        model: a ``UniGenDet`` (possibly compiled or wrapped).
        shared: the side that trains ``embed.*`` and ``lm_head.*``: "det", "gen", or "frozen" (in neither side;
            the caller must then freeze them).
    Returns:
        ``{"det": [(name, param), ...], "gen": [...]}``.
    Raises:
        ValueError: on a bad ``shared``, or when a trainable parameter belongs to neither side (all such names are
            listed), so that a new module cannot go untrained without notice.
    """
    if shared not in SHARED_OWNERS:
        raise ValueError(f"shared must be one of {SHARED_OWNERS}, got {shared!r}")
    sides: dict[str, list[tuple[str, nn.Parameter]]] = {side: [] for side in SIDES}
    orphans = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        plain = _plain_name(name)
        owners = [side for side, pattern in _SIDE_PATTERNS.items() if pattern.match(plain)]
        if not owners and _SHARED_PATTERN.match(plain):
            if shared == "frozen":
                continue
            owners = [shared]
        if not owners:
            orphans.append(name)
            continue
        assert len(owners) == 1, f"{name} matches both sides"  # the patterns are disjoint by construction
        sides[owners[0]].append((name, param))
    if orphans:
        raise ValueError(f"trainable parameters in neither the det nor the gen side (freeze them or add them to "
                         f"unigendet.training.optim._SIDE_PATTERNS): {orphans}")
    return sides


#####################################################################################################
# Optimiser
#####################################################################################################

_EMBEDDING_PATTERN = re.compile(r"(.*\.)?(embed|pos_embed)\.weight")


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two AdamW parameter groups: ``weight_decay`` for >=2-D weights, 0 for the rest.

    No decay goes to 1-D parameters (biases, norm scales) and to embedding tables (``embed.weight``, the ViT's
    ``pos_embed.weight``), whose rows are looked up rather than multiplied. Empty groups are left out.

    Args:
        named_params: (name, parameter) pairs, e.g. one side of ``partition``.
        weight_decay: the decay of the first group.
    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``.
    Raises:
        ValueError: when a parameter is given twice.
    """
    decay, no_decay, seen = [], [], set()
    for name, param in named_params:
        if id(param) in seen:
            raise ValueError(f"parameter {name} is given twice")
        seen.add(id(param))
        if param.ndim < 2 or _EMBEDDING_PATTERN.fullmatch(_plain_name(name)):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], lr: float,
                    cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``named_params`` with the groups of ``param_groups`` and the betas/eps of ``cfg``.

    Args:
        named_params: (name, parameter) pairs, e.g. ``partition(model)["det"]``.
        lr: the peak learning rate (e.g. ``cfg.lr("det")``).
        cfg: weight decay, betas and eps.
    Raises:
        ValueError: when ``named_params`` is empty.
    """
    groups = param_groups(named_params, cfg.weight_decay)
    if not groups:
        raise ValueError("build_optimizer got no parameters")
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


#####################################################################################################
# Learning-rate schedule
#####################################################################################################


def effective_warmup(warmup_steps: int, total_steps: int, warn: bool = True) -> int:
    """The warm-up actually used: ``warmup_steps``, capped at ``total_steps // 2`` with a warning.

    Raises:
        ValueError: when ``total_steps <= 0`` or ``warmup_steps < 0``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    cap = total_steps // 2
    if warmup_steps > cap:
        if not warn:
            return cap
        log.warning("warmup_steps=%d exceeds half of the %d-step run; warming up for %d steps instead",
                    warmup_steps, total_steps, cap)
        return cap
    return warmup_steps


def lr_lambda(cfg: OptimConfig, total_steps: int, warn: bool = True) -> Callable[[int], float]:
    """The learning-rate multiplier for ``LambdaLR``, as a function of the step (0-based).

    With ``w = effective_warmup(cfg.warmup_steps, total_steps)``: ``(step + 1) / (w + 1)`` for ``step < w`` (from
    ``1 / (w + 1)`` up to the peak 1 at ``step = w``), then, with ``p = (step - w) / (total_steps - w)`` clamped to
    [0, 1] and ``r = cfg.min_lr_ratio``: 1 (constant), ``r + (1 - r) * (1 + cos(pi * p)) / 2`` (cosine) or
    ``1 - (1 - r) * p`` (linear). The decay reaches ``r`` at ``total_steps`` and stays there.
    """
    warmup = effective_warmup(cfg.warmup_steps, total_steps, warn)
    decay_steps = total_steps - warmup  # >= 1 since warmup <= total_steps // 2
    schedule, ratio = cfg.schedule, cfg.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(max((step - warmup) / decay_steps, 0.0), 1.0)
        if schedule == "cosine":
            return ratio + (1.0 - ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - ratio) * progress

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    warn: bool = True) -> LambdaLR:
    """A ``LambdaLR`` over every group of ``optimizer`` with ``lr_lambda(cfg, total_steps)`` (``warn``: log a capped
    warm-up; the module's second optimiser shares the setting and stays quiet); step it per
    optimiser step."""
    return LambdaLR(optimizer, lr_lambda(cfg, total_steps, warn))
