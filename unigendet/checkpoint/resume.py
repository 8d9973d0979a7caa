"""Exact resume: the per-rank state Lightning does not checkpoint.

Lightning writes a checkpoint's non-tensor state from rank 0 only (``meta.pt`` of a distributed checkpoint, the
whole file otherwise), and it saves no random-generator states at all. Two things differ per rank and decide
whether a resumed run repeats an uninterrupted one step for step:

* the RNG states (torch CPU + CUDA, numpy, python): flow noise, VAE posterior samples;
* the data-stream positions, which Lightning keeps in ``loops.fit_loop.state_dict.combined_loader`` - rank 0's.

Features:
* :func:`run_state` / :func:`restore_run_state`: what ``LitUniGenDet`` adds to a checkpoint (config, counters,
  tokenizer, and every rank's RNG states and data positions, gathered with
  :func:`unigendet.distributed.ranks.gather_per_rank` so that rank 0 writes all of them) and takes back;
* :func:`rng_state` / :func:`set_rng_state`;
* :func:`loader_states` / :func:`set_loader_states`: the fit loop's loader states inside a checkpoint dict;
* :func:`drop_redone_checkpoints`: after an automatic resume, the step checkpoints of the killed run's future.
"""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unigendet.distributed.ranks import gather_per_rank, world

log = logging.getLogger("unigendet.train")
_LOADER_PATH = ("loops", "fit_loop", "state_dict")


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


def run_state(checkpoint: dict[str, Any], config: dict, counters: dict, data) -> dict[str, Any]:
    """The ``checkpoint["unigendet"]`` entry (a collective: every rank calls it). ``data``: the run's
    :class:`~unigendet.training.data_contract.TrainingData`, or None."""
    progress = data.train_progress() if data is not None else None
    state = {"config": config, "counters": dict(counters),
             "ranks": gather_per_rank({"rng": rng_state(), "loaders": loader_states(checkpoint),
                                       "progress": progress})}
    if data is not None and data.tok is not None:
        state["tokenizer_json"] = data.tok.path.read_text()
    return state


def restore_run_state(checkpoint: dict[str, Any], data) -> tuple[dict, dict | None]:
    """Checks the tokenizer, restores this rank's data positions; returns (counters, this rank's RNG states to set
    when training resumes, or None). Written by another number of processes (or loader workers), the data pass
    continues resharded over this layout (``resume_train_progress``); the RNG states of another number of processes
    are not restored (warned)."""
    state = checkpoint.get("unigendet", {})
    check_tokenizer(data, state.get("tokenizer_json"))
    ranks = state.get("ranks") or []
    rank, size = world()
    same_layout = len(ranks) == size
    if ranks and data is not None:  # the data decides whether its layout (ranks x loader workers) is the same
        same_layout = data.resume_train_progress([r.get("progress") for r in ranks])
    if same_layout and len(ranks) == size:
        set_loader_states(checkpoint, ranks[rank]["loaders"])
    else:
        set_loader_states(checkpoint, [])  # another layout's loader states: the resharded progress replaces them
    rng = ranks[rank]["rng"] if len(ranks) == size else None  # set when training resumes (loader setup draws first)
    if ranks and len(ranks) != size:
        log.warning("checkpoint written by %d processes, resumed by %d: weights and optimiser states are "
                    "resharded exactly; RNG states are not restored; %s", len(ranks), size,
                    "the data pass continues where it was, resharded" if data is not None
                    else "the data loaders start again")
    return state.get("counters", {}), rng


def check_tokenizer(data, saved: str | None) -> None:
    """A checkpoint's token ids mean nothing under another tokenizer (the demo corpus trains its own BPE, so two
    seeds give two vocabularies): refuse to resume or evaluate with a data tokenizer that differs from the one the
    checkpoint was trained with."""
    tok = data.tok if data is not None else None
    if saved is None or tok is None or json.loads(tok.path.read_text()) == json.loads(saved):
        return
    raise ValueError(f"the data's tokenizer ({tok.path}) is not the one this checkpoint was trained with, so its "
                     "token ids would be misread; pass --data.tokenizer=<the tokenizer.json of the training data> "
                     "(for `make demo`: demo-run/corpus/tokenizer.json)")


_STEP = re.compile(r"(?:^|[-_])step=(\d+)")


def drop_redone_checkpoints(trainer) -> list[Path]:
    """After an automatic resume (``--ckpt_path last``, Slurm's ``hpc_ckpt_N``), remove the step checkpoints that
    the killed run wrote after the one resumed from (a step in the file name above the resumed step), on rank 0.
    This run writes them again; Lightning would keep the old ones beside the new (``-v1``) and never delete them,
    since its retention state (restored from the older checkpoint) does not know them: one more full checkpoint on
    disk per unlucky preemption. Only for ModelCheckpoints that delete (``save_top_k >= 0``); ``last*`` and the
    checkpoints the restored state tracks are left alone."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from unigendet.checkpoint.fallback import checkpoints_in

    gone: list[Path] = []
    if not trainer.is_global_zero:
        return gone
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint) or cb.save_top_k < 0 or not cb.dirpath:
            continue
        known = {Path(p).resolve() for p in (*cb.best_k_models, cb.best_model_path, cb.last_model_path) if p}
        for path in checkpoints_in(cb.dirpath):
            m = _STEP.search(path.name)
            if (path.name.startswith("last") or m is None or int(m.group(1)) <= trainer.global_step
                    or path.resolve() in known):
                continue
            trainer.strategy.checkpoint_io.remove_checkpoint(path)
            gone.append(path)
    if gone:
        log.info("resumed at step %d: removed %d checkpoint(s) of the interrupted run's later steps, which this run "
                 "writes again: %s", trainer.global_step, len(gone), ", ".join(p.name for p in gone))
    return gone
