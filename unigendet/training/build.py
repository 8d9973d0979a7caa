"""Building the networks a training run needs: the student (random, or from a BAGEL / UniGenDet folder), the frozen
parts, the sides a stage does not train, and the DIGA teacher; sharded with FSDP2 when a device mesh is given.

Sharded and initialised from a folder, the networks are built on the meta device, sharded, and only this rank's shards
are allocated and filled, one tensor at a time: no rank ever holds the whole network.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from unigendet.distributed.sharding import FSDPConfig, shard
from unigendet.model.bagel_config import config_from_bagel_dir
from unigendet.model.config import ModelOverrides, PresetOrFolder, UniGenDetConfig
from unigendet.model.unigendet import UniGenDet
from unigendet.training.optim import partition
from unigendet.training.stages import Stage

log = logging.getLogger("unigendet.train")


def build_networks(cfg: UniGenDetConfig, stage: Stage, *, seed: int, init_from: str | None,
                   init_ae_from: str | None, freeze: list[str], attn_backend: str, shared: str, mesh=None,
                   fsdp: FSDPConfig | None = None, device=None) -> tuple[UniGenDet, UniGenDet | None]:
    """(student, DIGA teacher or None). ``mesh``: the data-parallel device mesh (FSDP2), ``device`` its device;
    ``shared``: the optimiser's treatment of the shared embeddings (``"frozen"`` freezes them)."""
    per_shard = mesh is not None and bool(init_from)
    torch.manual_seed(seed)
    if per_shard:
        with torch.device("meta"):
            model = UniGenDet(cfg)
    else:
        model = UniGenDet(cfg)
        model.init_weights()
        _load_whole(model, cfg, init_from, init_ae_from)
    model.attn_backend = attn_backend
    for part in freeze:
        if not hasattr(model, part):
            raise ValueError(f"cannot freeze unknown part {part!r}")
        getattr(model, part).requires_grad_(False)
    if shared == "frozen":
        model.embed.requires_grad_(False)
        model.lm_head.requires_grad_(False)
    sides = partition(model, shared)
    for side, trained in (("det", stage.train_det), ("gen", stage.train_gen)):
        if not trained:
            for _, p in sides[side]:
                p.requires_grad_(False)
    teacher = None
    if stage.diga:
        if per_shard:
            with torch.device("meta"):
                teacher = UniGenDet(cfg)
            teacher.attn_backend = attn_backend
        else:
            teacher = copy.deepcopy(model)
        teacher.requires_grad_(False).eval()
    if mesh is not None:  # FSDP2Strategy / ModelParallelStrategy: shard, the teacher alike
        shard(model, mesh, fsdp or FSDPConfig())
        if teacher is not None:
            shard(teacher, mesh, fsdp or FSDPConfig())
    if per_shard:
        from unigendet.checkpoint.folders import load_weights

        model.to_empty(device=device)
        if teacher is not None:
            teacher.to_empty(device=device)  # the caller copies the student into it
        torch.manual_seed(seed)
        report = load_weights(model, init_from, device=str(device))
        log.info("initialised from %s, shard by shard: %s", init_from, report)
    return model, teacher


def _load_whole(model: UniGenDet, cfg: UniGenDetConfig, init_from: str | None, init_ae_from: str | None) -> None:
    if init_from:
        from unigendet.checkpoint.folders import load_weights

        log.info("initialised from %s: %s", init_from, load_weights(model, init_from))
    if init_ae_from:
        from unigendet.training.autoencoder import load_autoencoder

        log.info("autoencoder from %s (trained: %s)", init_ae_from, load_autoencoder(model.vae, init_ae_from))
    elif cfg.vae.kind == "conv" and not init_from:
        log.warning("the %s autoencoder is random: pass --model.init_ae_from=<file from unigendet train-ae>",
                    cfg.vae.kind)


def resolve_config(model_name, model_overrides, init_from: str | None,
                   init_ae_from: str | None) -> tuple[str | None, dict, UniGenDetConfig]:
    """(the preset name or folder as a string, the overrides as a nested dict, the model config): from a preset, or
    from the ``init_from`` folder's own config when no preset is named. Errors name the setting to fix."""
    if model_name is None and not init_from:
        raise ValueError("set model.model_name (a preset: tiny, demo, debug, bagel-7b-mot) or model.init_from "
                         "(a BAGEL / UniGenDet model folder, whose architecture is then used)")
    if init_ae_from and not Path(init_ae_from).is_file():
        raise ValueError(f"model.init_ae_from: no autoencoder file {init_ae_from} (train it: unigendet train-ae "
                         f"--corpus <corpus folder> --out {init_ae_from})")
    model_name = None if model_name is None else str(PresetOrFolder(model_name))
    source = model_name if model_name is not None else str(PresetOrFolder(init_from))
    if not isinstance(model_overrides, ModelOverrides):
        model_overrides = ModelOverrides.from_dict(model_overrides)
    overrides = model_overrides.to_dict()
    if Path(source).is_dir():
        from unigendet.checkpoint.integrity import verify_folder

        verify_folder(source)  # before its config is read (a folder without SHA256SUMS is not checked)
        return model_name, overrides, config_from_bagel_dir(source).with_overrides(overrides)
    return model_name, overrides, UniGenDetConfig.from_name(source, **overrides)


@torch.no_grad()
def copy_weights(model: UniGenDet, teacher: UniGenDet, ema=None) -> None:
    """``teacher`` takes ``model``'s weights in place (shard by shard under FSDP2: both are sharded alike), then the
    EMA's when ``ema`` is given."""
    src = dict(model.named_parameters())
    for name, p in teacher.named_parameters():
        p.copy_(src[name].detach())
    if ema is not None:
        ema.copy_to(teacher)


def ready_teacher(teacher: UniGenDet, model: UniGenDet) -> UniGenDet:
    """The teacher in eval mode (Lightning puts every submodule in train mode at the start of fit), on the
    student's device."""
    if teacher.training:
        teacher.eval()
    if teacher.embed.weight.device != model.embed.weight.device:
        teacher.to(model.embed.weight.device)
    return teacher
