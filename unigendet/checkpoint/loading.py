"""A network from whatever a user points at: a BAGEL / UniGenDet folder (:mod:`unigendet.checkpoint.folders`) or a
``LitUniGenDet`` training checkpoint (a ``.ckpt`` file, or an FSDP2 distributed-checkpoint folder of ``*.distcp``
shards + ``meta.pt``), read without Lightning and without unpickling anything but tensors and plain containers.
A training checkpoint gives its EMA weights when it has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from unigendet.checkpoint.folders import CheckpointError, LoadReport, assign, load_weights
from unigendet.checkpoint.integrity import verify_file, verify_folder
from unigendet.model.bagel_config import config_from_bagel_dir
from unigendet.model.config import UniGenDetConfig
from unigendet.model.unigendet import UniGenDet


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU; a file holding other pickled objects (which could run code) is
    refused with a :class:`CheckpointError` naming it."""
    import pickle

    verify_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: refused: it holds pickled objects other than tensors and plain containers, "
                              f"which are not loaded because they could run code ({first})") from e


def load_lightning_checkpoint(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                              use_ema: bool = True) -> tuple[UniGenDet, LoadReport, str | None]:
    """A ``LitUniGenDet`` training checkpoint -> (network, report, tokenizer.json text or None): a ``.ckpt`` file,
    or a distributed checkpoint folder (FSDP2: ``*.distcp`` shards + ``meta.pt``), consolidated here one tensor at
    a time on any number of processes (one, typically).

    Loaded with ``weights_only=True`` (no code runs), after its checksums are verified. The EMA weights are used
    when present and ``use_ema``.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "meta.pt").is_file() or not (path / ".metadata").is_file():
            raise CheckpointError(f"{path} is a folder but not a complete distributed checkpoint (meta.pt, .metadata)")
        verify_folder(path)
        ckpt = safe_torch_load(path / "meta.pt")
        tensors = _DistributedTensors(path)
    else:
        ckpt = safe_torch_load(path)
        tensors = ckpt["state_dict"]
    extra = ckpt.get("unigendet")
    if extra is None:
        raise CheckpointError(f"{path} is not a unigendet training checkpoint (no 'unigendet' section)")
    cfg = UniGenDetConfig.from_dict(extra["config"])
    with torch.device("meta"):
        model = UniGenDet(cfg).to(dtype)
    state = {k[len("model."):]: k for k in tensors.keys() if k.startswith("model.")}
    report = LoadReport(files=[path.name])
    ema = {}
    if use_ema:  # the EMA is the submodule ``ema`` (parameter names with "." written "__")
        ema = {k[len("ema."):].replace("__", "."): k for k in tensors.keys()
               if k.startswith("ema.") and k not in ("ema.n_updates_", "ema._extra_state")}
    targets = dict(model.named_parameters())
    for name, p in targets.items():
        key = ema.get(name, state.get(name))
        value = None if key is None else tensors[key]
        if value is None:
            report.missing.append(name)
            continue
        if tuple(value.shape) != tuple(p.shape):
            raise CheckpointError(f"{path}: {name} has shape {list(value.shape)}, the config expects {list(p.shape)}")
        assign(model, name, value.to(device))
        report.loaded.append(name)
    report.unexpected = sorted(set(state) - set(targets))
    if report.missing or report.unexpected:
        raise CheckpointError(f"checkpoint {path} does not match its own config: {report}")
    return model, report, extra.get("tokenizer_json")


def is_training_checkpoint(path: str | Path) -> bool:
    """A LitUniGenDet checkpoint: a ``.ckpt`` file, or a distributed checkpoint folder (``meta.pt`` + ``.metadata``)."""
    path = Path(path)
    return path.suffix == ".ckpt" or (path.is_dir() and (path / "meta.pt").is_file())


class _DistributedTensors:
    """The ``state_dict`` entries of a torch.distributed.checkpoint folder, read one full tensor at a time (no
    process group needed)."""

    def __init__(self, folder: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.folder = folder
        meta = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        prefix = "state_dict."
        self.meta = {k[len(prefix):]: m for k, m in meta.items()
                     if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}

    def keys(self):
        return self.meta.keys()

    def __getitem__(self, key: str) -> Tensor:
        import torch.distributed.checkpoint as dcp

        m = self.meta[key]
        out = {"state_dict": {key: torch.empty(tuple(m.size), dtype=m.properties.dtype)}}
        dcp.load(out, checkpoint_id=str(self.folder), no_dist=True)
        return out["state_dict"][key]


def load_model(folder: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
               strict: bool = True, cfg: UniGenDetConfig | None = None) -> tuple[UniGenDet, LoadReport]:
    """Build the network described by a BAGEL / UniGenDet folder on the meta device and stream its weights in.
    A ``.ckpt`` file (a training checkpoint) is accepted too: its EMA weights when present."""
    if is_training_checkpoint(folder):
        model, report, _ = load_lightning_checkpoint(folder, device=device, dtype=dtype)
        return model, report
    folder = Path(folder)
    verify_folder(folder)  # before its config is read
    cfg = cfg or config_from_bagel_dir(folder)
    with torch.device("meta"):
        model = UniGenDet(cfg).to(dtype)
    report = load_weights(model, folder, strict=strict, device=device)
    return model, report
