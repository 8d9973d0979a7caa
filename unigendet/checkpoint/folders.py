"""Checkpoint IO in the BAGEL format: load BAGEL / UniGenDet folders, export ours the same way.

Features:
* weights only from safetensors (no pickle); single file (``ema.safetensors``/``model.safetensors``) or sharded
  (``model.safetensors.index.json`` + ``model-0000k-of-0000n.safetensors``);
* streaming: tensors are read one at a time from memory-mapped files and assigned into a model built on the
  meta device, so a 29 GB file needs ~1x its size in RAM, never 2x;
* a :class:`LoadReport` of loaded / missing / unexpected keys: the UniGenDet-only heads (``fake_cls_head``,
  ``diga_mlp``, ``latent_to_vit_connector``) are *expected* missing in a BAGEL release and start fresh; any other
  missing or unexpected key, and any shape mismatch, is an error naming the key;
* the FLUX AE comes from ``ae.safetensors`` (bare ``encoder.*``/``decoder.*`` keys);
* export writes sharded safetensors + index + the json configs (+ ``ae.safetensors``), loadable back here and by
  the reference code.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from unigendet.checkpoint.atomic import atomic_path
from unigendet.checkpoint.errors import CheckpointError  # noqa: F401  (raised here; imported from here elsewhere)
from unigendet.checkpoint.keymap import AE_PREFIX, UNIGENDET_ONLY_PREFIXES, from_bagel, to_bagel
from unigendet.model.bagel_config import config_to_bagel_files
from unigendet.model.layers import PosEmbed2D, RMSNorm, sincos_2d_table
from unigendet.model.unigendet import UniGenDet

INDEX = "model.safetensors.index.json"
SINGLE_FILES = ("ema.safetensors", "model.safetensors")
AE_FILE = "ae.safetensors"

#####################################################################################################
# Reports
#####################################################################################################


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # reference key names
    expected_missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {', '.join(self.files) or 'nothing'}"]
        if self.expected_missing:
            heads = sorted({k.split(".")[0] for k in self.expected_missing})
            parts.append(f"freshly initialised (not in the checkpoint, as expected for a BAGEL release): {heads}")
        if self.missing:
            parts.append(f"MISSING {len(self.missing)}: {self.missing[:8]}{' ...' if len(self.missing) > 8 else ''}")
        if self.unexpected:
            parts.append(f"UNEXPECTED {len(self.unexpected)}: {self.unexpected[:8]}"
                         f"{' ...' if len(self.unexpected) > 8 else ''}")
        return "; ".join(parts)




#####################################################################################################
# Loading
#####################################################################################################


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the network weights (not the AE)."""
    index = folder / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        root = folder.resolve()
        for n in names:
            if not n or Path(n).name != n or (folder / n).resolve().parent != root:
                raise CheckpointError(f"{index} names a shard outside the folder: {n!r}")
        return [folder / n for n in names]
    for name in SINGLE_FILES:
        if (folder / name).exists():
            return [folder / name]
    raise FileNotFoundError(f"no weights in {folder}: expected {INDEX} or one of {SINGLE_FILES}")


def _is_dtensor(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def assign(model: nn.Module, name: str, value: Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    old = getattr(module, attr)
    value = value.to(dtype=old.dtype)
    if _is_dtensor(old):  # a parameter sharded by FSDP2: keep only this rank's part of the full value
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():
            old.copy_(distribute_tensor(value.to(old.device), old.device_mesh, old.placements, src_data_rank=None))
    elif old.is_meta:
        setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        with torch.no_grad():
            old.copy_(value)


def _load_files(model: nn.Module, files: list[Path], rename, targets: dict[str, Tensor], device: str,
                report: LoadReport) -> None:
    for path in files:
        report.files.append(path.name)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                ours = rename(key)
                if ours is None or ours not in targets:
                    report.unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                want = tuple(targets[ours].shape)
                if shape != want:
                    raise CheckpointError(f"{path.name}: {key} has shape {list(shape)} but the model config expects "
                                          f"{list(want)} (parameter {ours}); is the config right for this checkpoint?")
                assign(model, ours, f.get_tensor(key).to(device))
                report.loaded.append(key)


def load_weights(model: UniGenDet, folder: str | Path, *, strict: bool = True, device: str = "cpu",
                 load_ae: bool = True) -> LoadReport:
    """Load a BAGEL / UniGenDet folder into ``model`` (meta-built, materialised, or sharded by FSDP2 and then
    materialised with ``to_empty``: each rank reads one full tensor at a time and keeps its shard). Parameters left
    without a value (the expected-missing heads) are materialised on ``device`` and freshly initialised."""
    from unigendet.checkpoint.integrity import verify_folder

    folder = Path(folder)
    verify_folder(folder)
    report = LoadReport()
    targets = {n: p for n, p in model.named_parameters() if not n.startswith(AE_PREFIX)}
    _load_files(model, weight_files(folder), from_bagel, targets, device, report)
    if load_ae and any(n.startswith(AE_PREFIX) for n, _ in model.named_parameters()):
        ae_targets = {n: p for n, p in model.named_parameters() if n.startswith(AE_PREFIX)}
        if (folder / AE_FILE).exists():
            _load_files(model, [folder / AE_FILE], lambda k: AE_PREFIX + k, ae_targets, device, report)
        for name in ae_targets:
            if to_bagel(name) is None and AE_PREFIX + name[len(AE_PREFIX):] not in _loaded_ours(report, ae=True):
                report.missing.append(name)
    loaded_ours = _loaded_ours(report)
    for name in targets:
        key = to_bagel(name)
        if key is None:
            raise CheckpointError(f"parameter {name} has no BAGEL name (convert.BAGEL_MAP is incomplete)")
        if key not in loaded_ours:
            (report.expected_missing if key.startswith(UNIGENDET_ONLY_PREFIXES) else report.missing).append(key)
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(f"checkpoint {folder} does not match the model: {report}")
    _materialise_fresh(model, device)
    _fresh_sharded(model, set(report.expected_missing))
    return report


def _fresh_sharded(model: UniGenDet, keys: set[str]) -> None:
    """The fresh init of sharded parameters the checkpoint did not provide: the full tensor (the same on every
    rank under the same seed; they are small heads), of which each rank keeps its shard."""
    for name, p in model.named_parameters():
        if _is_dtensor(p) and to_bagel(name) in keys:
            module_name, _, attr = name.rpartition(".")
            full = torch.empty(p.shape, dtype=p.dtype)
            fresh_parameter_value(model.get_submodule(module_name), attr, full)
            assign(model, name, full)


def _loaded_ours(report: LoadReport, ae: bool = False) -> set[str]:
    if ae:
        return {AE_PREFIX + k for k in report.loaded}
    return set(report.loaded)


def _materialise_fresh(model: UniGenDet, device: str) -> None:
    """Give parameters the checkpoint did not provide real storage and a fresh init. Parts missing entirely (the
    UniGenDet heads of a BAGEL release) get the model's own init; single stray parameters (``strict=False``) get
    the same rule one tensor at a time, never touching what was loaded."""
    parts = [n for n, m in model.named_children()
             if m is not None and any(True for _ in m.parameters()) and all(p.is_meta for p in m.parameters())]
    for name in parts:
        getattr(model, name).to_empty(device=device)
    if parts:
        model.init_weights(parts)
    for module in model.modules():
        for attr, p in list(module.named_parameters(recurse=False)):
            if p.is_meta:
                value = torch.empty(p.shape, dtype=p.dtype, device=device)
                fresh_parameter_value(module, attr, value)
                setattr(module, attr, nn.Parameter(value, requires_grad=p.requires_grad))


@torch.no_grad()
def fresh_parameter_value(module: nn.Module, attr: str, out: Tensor, std: float = 0.02) -> None:
    """The init ``UniGenDet.init_weights`` would give this one parameter."""
    if isinstance(module, PosEmbed2D):
        out.copy_(sincos_2d_table(module.dim, module.side))
    elif attr == "bias":
        out.zero_()
    elif isinstance(module, (RMSNorm, nn.LayerNorm, nn.GroupNorm)):
        out.fill_(1.0)
    elif isinstance(module, (nn.Conv2d,)):
        nn.init.kaiming_uniform_(out, a=5**0.5)
    else:
        out.normal_(0.0, std)


#####################################################################################################
# Export
#####################################################################################################


def bagel_state_dict(model: UniGenDet) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(network tensors under reference names, AE tensors under bare BFL names)."""
    net, ae = {}, {}
    for name, p in model.named_parameters():
        if name.startswith(AE_PREFIX):
            ae[name[len(AE_PREFIX):]] = p.detach()
            continue
        key = to_bagel(name)
        if key is None:
            raise CheckpointError(f"parameter {name} has no BAGEL name (convert.BAGEL_MAP is incomplete)")
        net[key] = p.detach()
    return net, ae


def save_folder(model: UniGenDet, out: str | Path, *, max_shard_bytes: int = 4 * 1024**3,
                dtype: torch.dtype | None = None, single_file: bool = False, progress: bool = False) -> Path:
    """Write ``model`` as a UniGenDet/BAGEL folder: weights, ae.safetensors, json configs.

    Weights go to shards + ``model.safetensors.index.json`` (default), or with ``single_file`` to one
    ``ema.safetensors`` (what BAGEL's own inference loader opens). Each file is written under a temporary name and
    renamed into place, and weight files of an earlier export that the new one does not use are removed (the index
    first), so an interrupted export never leaves a complete-looking but inconsistent folder; ``SHA256SUMS`` is
    removed first and written last (:mod:`unigendet.checkpoint.integrity`), and loading verifies it. Files are
    readable by everyone the umask allows (0644 by default), like any released model. ``progress``: a bar over the
    shards.
    """
    from unigendet.checkpoint.integrity import SUMS, seal

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMS).unlink(missing_ok=True)  # sealed again once every file is written
    net, ae = bagel_state_dict(model)
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    if single_file:
        (out / INDEX).unlink(missing_ok=True)
        shards = [net]
    else:
        shards = [{}]
        size = 0
        for key, t in net.items():
            nbytes = t.numel() * torch.empty((), dtype=t.dtype if dtype is None else dtype).element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += nbytes
    n = len(shards)
    weight_map, total, written = {}, 0, set()
    if progress and n > 1:
        from tqdm import tqdm

        shards = tqdm(shards, desc="export", unit="shard", file=sys.stderr, dynamic_ncols=True)
    for i, shard in enumerate(shards):
        fname = SINGLE_FILES[0] if single_file else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        tensors = {k: cast(v).contiguous().cpu() for k, v in shard.items()}
        _atomic_save(tensors, out / fname)
        written.add(fname)
        for k, v in tensors.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    if not single_file:
        _atomic_write(out / INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                              indent=2))
    stale = [*out.glob("model-*-of-*.safetensors"), *(out / name for name in SINGLE_FILES)]
    for path in stale:
        if path.name not in written:
            path.unlink(missing_ok=True)
    if not single_file:
        written.add(INDEX)
    if ae:
        _atomic_save({k: v.contiguous().cpu() for k, v in ae.items()}, out / AE_FILE)
        written.add(AE_FILE)
    for fname, content in config_to_bagel_files(model.cfg).items():
        _atomic_write(out / fname, json.dumps(content, indent=2))
        written.add(fname)
    seal(out, sorted(written))
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "generation_config.json")


def copy_tokenizer(src: str | Path, out: str | Path) -> list[str]:
    """Copy the tokenizer files a BAGEL folder carries from ``src`` (a folder or a tokenizer.json) to ``out``."""
    import shutil

    src = Path(src)
    folder = src.parent if src.is_file() else src
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).exists() and (folder / name).resolve() != (Path(out) / name).resolve():
            with atomic_path(Path(out) / name, what="tokenizer file") as partial:
                shutil.copyfile(folder / name, partial)
            copied.append(name)
    if "tokenizer.json" not in copied and not (Path(out) / "tokenizer.json").exists():
        raise FileNotFoundError(f"no tokenizer.json in {folder}")
    return copied


def _atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    # safetensors creates 0600 files; a released model is readable like any file
    with atomic_path(path, what="weights file", mode=0o666 & ~_umask()) as partial:
        save_file(tensors, str(partial), metadata={"format": "pt"})


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, text: str) -> None:
    with atomic_path(path, what="config file") as partial:
        partial.write_text(text)
