"""Exponential moving average (EMA) of a model's trainable weights.

Features:
* an fp32 shadow of every floating-point parameter with ``requires_grad`` (frozen parts such as the VAE never
  change, so they are not copied), kept on the device of its parameter, even if the model moves after the EMA
  was built;
* ``update`` after each optimiser step: ``shadow = d * shadow + (1 - d) * param`` with
  ``d = min(decay, (1 + n) / (10 + n))`` during the warm-up (n = updates so far), else ``d = decay``;
* ``swap(model)``: a context manager that evaluates with the EMA weights and restores the live ones on exit, even
  when the body raises; ``copy_to(model)`` writes the EMA weights for good (export);
* an ``nn.Module`` of buffers: a parent's ``state_dict`` (Lightning checkpoints, torch.distributed.checkpoint
  under FSDP2, sharded like the parameters) carries the shadow, the update count and the decay, so a resumed run
  continues exactly; a state for different parameter names or shapes is refused.
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


class EMA(nn.Module):
    """An fp32 exponential moving average of a model's trainable weights, as a module of buffers.

    The shadow lives in buffers (parameter names with ``.`` written as ``__``) and the update count in the buffer
    ``n_updates``, so a parent module's ``state_dict`` carries them: Lightning checkpoints them with the weights,
    and under FSDP2 (where the shadow of a sharded parameter is a sharded DTensor) torch.distributed.checkpoint
    saves each rank's shard. The decay and the warm-up flag travel as the module's extra state.

    Args:
        model: the model whose trainable floating-point parameters are averaged.
        decay: the EMA decay, in [0, 1).
        warmup: use ``min(decay, (1 + n) / (10 + n))`` for the n-th update (0-based), so early averages are not
            dominated by the initial weights.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True) -> None:
        super().__init__()
        self.decay = _check_decay(decay)
        self.warmup = bool(warmup)
        self._names: dict[str, str] = {}  # parameter name -> buffer name
        with torch.no_grad():
            for name, p in _tracked(model):
                self._names[name] = name.replace(".", "__")
                self.register_buffer(self._names[name], p.detach().float().clone())
        self.register_buffer("n_updates_", torch.zeros((), dtype=torch.long))

    @property
    def n_updates(self) -> int:
        return int(self.n_updates_)

    @property
    def shadow(self) -> dict[str, Tensor]:
        """``{parameter name: fp32 average}`` (the buffers themselves, not copies)."""
        return {name: self._buffers[buf] for name, buf in self._names.items()}

    def decay_at(self, n: int) -> float:
        """The decay used by the update that follows ``n`` earlier updates."""
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The model's parameters under the shadow's names; raises when some are missing."""
        params = dict(model.named_parameters())
        missing = [name for name in self._names if name not in params]
        if missing:
            raise ValueError(f"the model has no parameters named {missing} (tracked by this EMA)")
        return {name: params[name] for name in self._names}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards the model's current weights (call after each optimiser step)."""
        weight = 1.0 - self.decay_at(self.n_updates)
        for name, param in self._params(model).items():
            buf = self._names[name]
            shadow = self._buffers[buf]
            if shadow.device != param.device:
                shadow = self._buffers[buf] = shadow.to(param.device)
            shadow.lerp_(param.detach().float(), weight)
        self.n_updates_ += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into ``model`` (cast to each parameter's dtype and device)."""
        shadow = self.shadow
        for name, param in self._params(model).items():
            param.copy_(shadow[name])

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

    def get_extra_state(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.decay, self.warmup = _check_decay(state["decay"]), bool(state["warmup"])

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` with errors that name the parameters (not the buffer names).

        Raises:
            ValueError: when the state tracks other parameters or shapes than this EMA, or has a bad decay.
        """
        ours = {buf: name for name, buf in self._names.items()}
        theirs = {k for k in state_dict if k not in ("n_updates_", "_extra_state")}
        missing = sorted(ours[b] for b in set(ours) - theirs)
        unexpected = sorted(k.replace("__", ".") for k in theirs - set(ours))
        if missing or unexpected:
            raise ValueError(f"EMA state does not match the tracked parameters: missing {missing}, "
                             f"unexpected {unexpected}")
        shapes = [ours[b] for b in ours if tuple(state_dict[b].shape) != tuple(self._buffers[b].shape)]
        if shapes:
            raise ValueError(f"EMA state has other shapes for {shapes}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _check_decay(decay: float) -> float:
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return decay
