"""FSDP2 sharding of the UniGenDet network (``fully_shard``), used by ``LitUniGenDet.configure_model`` under
:class:`unigendet.distributed.strategy.FSDP2Strategy`.

Features:
* one shard unit per decoder layer and per ViT block, then the root (embeddings, connector, heads, adapters);
  the frozen VAE is left out (``ignored_params``): it is small, replicated, and only called through methods;
* optional activation checkpointing per layer/block (composable ``checkpoint``: parameter names stay clean);
* mixed precision: parameters gathered in ``param_dtype`` (bf16 by default), gradients reduced in ``reduce_dtype``
  (fp32), sharded master weights and optimiser states in the parameters' own dtype (fp32);
* ``forward_hidden`` (the DIGA teacher's pass) and ``project_diga`` run FSDP's forward hooks like ``forward``;
  :func:`unsharded` gathers the root's parameters for code that calls submodules directly (generation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from unigendet.constants import DTYPE_NAMES

DTYPES = {name: getattr(torch, attr) for name, attr in DTYPE_NAMES.items()}


@dataclass
class FSDPConfig:
    param_dtype: str = "bf16"
    """Dtype the parameters are gathered in for compute ("bf16", "fp16", "fp32")."""
    reduce_dtype: str = "fp32"
    """Dtype of the gradient reduce-scatter."""
    activation_checkpointing: bool = True
    """Recompute each decoder layer's and ViT block's activations in the backward pass."""
    reshard_after_forward: bool = True
    """Free the gathered parameters after each unit's forward (ZeRO-3); False keeps them until the backward."""

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"fsdp.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard(model: nn.Module, mesh, cfg: FSDPConfig) -> nn.Module:
    """Shard a ``UniGenDet`` in place over ``mesh`` (1-D data-parallel mesh); returns it."""
    from torch.distributed._composable import checkpoint
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    mp = MixedPrecisionPolicy(param_dtype=DTYPES[cfg.param_dtype], reduce_dtype=DTYPES[cfg.reduce_dtype])
    kw = {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": cfg.reshard_after_forward}
    for unit in [*model.vit.blocks, *model.decoder.layers]:
        if cfg.activation_checkpointing:
            checkpoint(unit)
        fully_shard(unit, **kw)
    fully_shard(model, ignored_params=set(model.vae.parameters()), **kw)
    for method in ("forward_hidden", "project_diga"):
        register_fsdp_forward_method(model, method)
    return model


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Gather the root unit's parameters for the ``with`` body (a no-op for an unsharded model): for code that
    calls the root's submodules directly. Layers and blocks gather themselves when called."""
    if not is_sharded(model) or getattr(model, "_gathered", False):  # inside ``gathered``: already whole
        yield model
        return
    # FSDP2 sets up its root state lazily in the root's first forward; a layer called first (generation before any
    # training forward, e.g. right after a resume) would otherwise take itself for a root and break the next forward
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    try:
        yield model
    finally:
        model.reshard()


@contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Every unit's full parameters on every rank for the ``with`` body, kept after each forward: forwards then run
    without collectives, so ranks may run different inputs and different numbers of forwards (data-parallel
    evaluation). Costs the full model's memory per rank. A no-op for an unsharded model."""
    if not is_sharded(model):
        yield model
        return
    from torch.distributed.fsdp import FSDPModule

    model._get_fsdp_state()._lazy_init()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    reshards = []
    for unit in units:
        group = unit._get_fsdp_state()._fsdp_param_group
        reshards.append(group is not None and group.post_forward_mesh_info is not None)
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    model._gathered = True
    try:
        yield model
    finally:
        model._gathered = False
        for unit, reshard in zip(units, reshards, strict=True):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)
