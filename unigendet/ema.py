"""Exponential moving average (EMA) of a model's trainable weights.

Features:
* an fp32 shadow of every floating-point parameter with ``requires_grad`` (frozen parts such as the VAE never
  change, so they are not copied), kept on the device of its parameter, even if the model moves after the EMA
  was built;
* ``update`` after each optimiser step: ``shadow = d * shadow + (1 - d) * param`` with
  ``d = min(decay, (1 + n) / (10 + n))`` during the warm-up (n = updates so far), else ``d = decay``;
* ``swap(model)``: a context manager that evaluates with the EMA weights and restores the live ones on exit, even
  when the body raises; ``copy_to(model)`` writes the EMA weights for good (export);
* ``state_dict`` / ``load_state_dict`` carry the shadow, the update count and the decay, so a resumed run
  continues exactly; a state for different parameter names is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn


def _tracked(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters an EMA follows: floating point and trainable."""
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point():
            yield name, param


class EMA:
    """An fp32 exponential moving average of a model's trainable weights.

    Args:
        model: the model whose trainable floating-point parameters are averaged.
        decay: the EMA decay, in [0, 1).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` for the n-th update (0-based), so early averages are not
            dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        self.decay = _check_decay(decay)
        self.warmup = bool(warmup)
        self.n_updates = 0
        with torch.no_grad():
            self.shadow: dict[str, Tensor] = {name: p.detach().float().clone() for name, p in _tracked(model)}

    def decay_at(self, n: int) -> float:
        """The decay used by the update that follows ``n`` earlier updates."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters under the shadow's names; raises when some are missing."""
        params = dict(model.named_parameters())
        missing = [name for name in self.shadow if name not in params]
        if missing:
            raise ValueError(f"the model has no parameters named {missing} (tracked by this EMA)")
        return {name: params[name] for name in self.shadow}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards the model's current weights (call after each optimiser step)."""
        weight = 1.0 - self.decay_at(self.n_updates)
        for name, param in self._params(model).items():
            shadow = self.shadow[name]
            if shadow.device != param.device:
                shadow = self.shadow[name] = shadow.to(param.device)
            shadow.lerp_(param.detach().float(), weight)
        self.n_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (cast to each parameter's dtype and device)."""
        for name, param in self._params(model).items():
            param.copy_(self.shadow[name])

    @contextmanager
    def swap(self, model: nn.Module) -> Iterator[nn.Module]:
        """Put the EMA weights into ``model`` for the ``with`` body, then restore the live weights (also when the
        body raises). Yields ``model``."""
        params = self._params(model)
        with torch.no_grad():
            live = {name: param.detach().clone() for name, param in params.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(live[name])

    def state_dict(self) -> dict[str, Any]:
        """``{"decay", "warmup", "n_updates", "shadow": {name: fp32 tensor}}`` (tensors are not copied)."""
        return {"decay": self.decay, "warmup": self.warmup, "n_updates": self.n_updates, "shadow": dict(self.shadow)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``: the shadow (onto the current shadow's devices), the update count, the decay
        and the warm-up flag.

        Raises:
            ValueError: when the state tracks other parameter names or shapes than this EMA, or has a bad decay.
        """
        shadow = state["shadow"]
        missing, unexpected = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the tracked parameters: missing {missing}, "
                             f"unexpected {unexpected}")
        shapes = [n for n in self.shadow if tuple(shadow[n].shape) != tuple(self.shadow[n].shape)]
        if shapes:
            raise ValueError(f"EMA state has other shapes for {shapes}")
        decay = _check_decay(state["decay"])
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
        self.decay, self.warmup, self.n_updates = decay, bool(state["warmup"]), int(state["n_updates"])


def _check_decay(decay: float) -> float:
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return decay
