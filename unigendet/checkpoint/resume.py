"""Exact resume: the per-rank state Lightning does not checkpoint.

Lightning writes a checkpoint's non-tensor state from rank 0 only (``meta.pt`` of a distributed checkpoint, the
whole file otherwise), and it saves no random-generator states at all. Two things differ per rank and decide
whether a resumed run repeats an uninterrupted one step for step:

* the RNG states (torch CPU + CUDA, numpy, python): flow noise, VAE posterior samples;
* the data-stream positions, which Lightning keeps in ``loops.fit_loop.state_dict.combined_loader`` - rank 0's.

Features:
* :func:`gather_per_rank` collects one picklable object from every rank (all ranks call it, as they all call
  ``on_save_checkpoint``), so rank 0 can write all of them;
* :func:`rng_state` / :func:`set_rng_state`;
* :func:`loader_states` / :func:`set_loader_states`: the fit loop's loader states inside a checkpoint dict.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

_LOADER_PATH = ("loops", "fit_loop", "state_dict")


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_per_rank(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (a collective: every rank must call it)."""
    _, size = world()
    if size == 1:
        return [obj]
    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def rng_state() -> dict[str, Any]:
    """The process's RNG states, in types ``torch.load(weights_only=True)`` accepts (no numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _loop_state(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    node: Any = checkpoint
    for key in _LOADER_PATH:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def loader_states(checkpoint: dict[str, Any]) -> list[Any] | None:
    """The training loaders' states in a checkpoint dict (None when it holds none)."""
    loop = _loop_state(checkpoint)
    return None if loop is None else loop.get("combined_loader")


def set_loader_states(checkpoint: dict[str, Any], states: list[Any] | None) -> None:
    loop = _loop_state(checkpoint)
    if loop is not None and states is not None:
        loop["combined_loader"] = states
