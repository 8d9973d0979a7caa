"""Generation quality with torch-fidelity: FID, KID and Inception Score of generated images against real ones, offline.

Features:

* **Offline by construction**: torch-fidelity downloads its Inception-v3 weights from GitHub when it is given no path;
  here a local file is required (:func:`inception_weights`) and always passed as ``feature_extractor_weights_path``,
  so nothing is ever downloaded. The real file is torch-fidelity's release asset
  ``weights-inception-2015-12-05-6726825d.pth`` (``INCEPTION_URL``), which users fetch themselves.
* **Validated before torch-fidelity sees it**: torch-fidelity calls ``torch.load(path, weights_only=False)``, which
  can run code pickled into the file. :func:`inception_weights` first loads it with ``weights_only=True`` (a file
  with pickled code or objects is refused with a ``ValueError``) and checks that it is a dict of tensors with the
  Inception-v3 keys and shapes (``fc.weight`` is (1008, 2048)). Validation is memoized per (path, size, mtime).
* **safetensors accepted**: a ``.safetensors`` copy is converted once to a plain ``.pth`` (``torch.save`` of the tensor
  dict) in a cache folder next to it (``.fidelity_cache/``, else a per-user temp folder), named by the file's SHA-256;
  the cached file is validated like any other before its path is returned.
* **One preprocessing for both sides** (docs/method.md, "Evaluation protocol": centre-cropped and resized to 299): the
  largest centred
  square, bicubic resize to 299, RGB, uint8 (:func:`fidelity_images`).
* **Features batch by batch, never all the images**: torch-fidelity's own extractor (:func:`inception_extractor`)
  turns each batch of images into pool features (2048) and unbiased logits (1008) (:func:`inception_features`,
  :func:`stream_features` over any iterable); only those are kept (12 KB an image), and the metrics come from them with
  torch-fidelity's own formulas, subset sampling and seeds (:func:`metrics_from_features`), so the numbers are the
  ones ``torch_fidelity.calculate_metrics`` gives on the same images. Features of different ranks can be gathered and
  concatenated (:func:`concat_features`) instead of the images.
* **Small-sample safe**: ``kid_subset_size`` defaults to ``min(1000, n_real, n_fake)`` and ``isc_splits`` is clipped
  to half the number of fakes (a split of one image has IS = 1 whatever it shows); IS is computed on the generated
  images. No feature caches, no worker processes, quiet.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from unigendet.checkpoint.atomic import atomic_path
from unigendet.constants import INCEPTION_WEIGHTS_ENV

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
ENV_VAR = INCEPTION_WEIGHTS_ENV
# a sample of torch-fidelity's FeatureExtractorInceptionV3 state-dict entries, first to last layer, with their shapes
REQUIRED_KEYS = {
    "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
    "Conv2d_1a_3x3.bn.running_mean": (32,),
    "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1),
    "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
    "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
    "fc.weight": (1008, 2048),
    "fc.bias": (1008,),
}
FEATURE_EXTRACTOR = "inception-v3-compat"
FID_LAYER, ISC_LAYER = "2048", "logits_unbiased"  # torch-fidelity's layers for FID and KID, and for IS
METRIC_NAMES = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid_mean",
                "kernel_inception_distance_std": "kid_std", "inception_score_mean": "is_mean",
                "inception_score_std": "is_std"}

_validated: dict[tuple, Path] = {}  # (resolved path, size, mtime_ns) -> the .pth path to hand to torch-fidelity


class InceptionWeightsMissing(FileNotFoundError):
    """No Inception-v3 weights file where the configuration points (torch-fidelity's file is never downloaded)."""


########################################################################################################################
# the weights file
########################################################################################################################
def _missing(path) -> InceptionWeightsMissing:
    where = "no path was given" if path is None else f"{str(path)!r} does not exist"
    return InceptionWeightsMissing(
        f"Inception-v3 weights for FID/KID/IS: {where}. Point the `inception_weights` argument (or the {ENV_VAR} "
        f"environment variable) at torch-fidelity's {INCEPTION_FILE}, which you download yourself from {INCEPTION_URL} "
        "(a .safetensors copy of it also works); nothing is downloaded automatically.")


def _check_state_dict(state, path: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{path}: not a dict of tensors (name -> tensor), so not Inception-v3 weights")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path}: not torch-fidelity's Inception-v3 weights, missing keys {missing[:3]} "
                         f"(expected {INCEPTION_FILE})")
    wrong = {k: tuple(state[k].shape) for k, shape in REQUIRED_KEYS.items() if tuple(state[k].shape) != shape}
    if wrong:
        raise ValueError(f"{path}: Inception-v3 tensors of the wrong shape {wrong} (expected {INCEPTION_FILE})")


def _load_pth(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickled code or objects (weights_only refuses them), or not a torch file at all
        raise ValueError(f"{path}: refused as Inception weights, it does not load as plain tensors with "
                         f"torch.load(weights_only=True) (pickled objects or code, or not a torch file): {e}") from e
    _check_state_dict(state, path)
    return state


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_dir(src: Path) -> Path:
    here = src.parent / ".fidelity_cache"
    if os.access(src.parent, os.W_OK):
        here.mkdir(exist_ok=True)
        return here
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    tmp = Path(tempfile.gettempdir()) / f"unigendet-fidelity-{uid}"
    tmp.mkdir(mode=0o700, exist_ok=True)
    return tmp


def _from_safetensors(path: Path) -> Path:
    from safetensors.torch import load_file

    try:
        state = load_file(path, device="cpu")
    except Exception as e:
        raise ValueError(f"{path}: not a readable safetensors file: {e}") from e
    _check_state_dict(state, path)
    out = _cache_dir(path) / f"{path.stem}-{_sha256(path)[:16]}.pth"
    if not out.is_file():
        with atomic_path(out, what="cached Inception weights", per_process=True) as partial:  # ranks race here
            torch.save(state, partial)
    return out


def inception_weights(path: str | os.PathLike | None) -> Path:
    """The validated ``.pth`` path of torch-fidelity's Inception-v3 weights, safe to pass to torch-fidelity.

    Raises:
        InceptionWeightsMissing: ``path`` is None or no file is there.
        ValueError: the file holds pickled objects/code, is not a dict of tensors, or lacks the Inception-v3 tensors.
    """
    if path is None or not Path(path).is_file():
        raise _missing(path)
    src = Path(path).resolve()
    st = src.stat()
    key = (str(src), st.st_size, st.st_mtime_ns)
    if key in _validated:
        return _validated[key]
    out = _from_safetensors(src) if src.suffix == ".safetensors" else src
    _load_pth(out)  # the file torch-fidelity will load (a cached conversion too: the cache folder may be shared)
    _validated[key] = out
    return out


########################################################################################################################
# the images
########################################################################################################################
def _square(img, size: int, resample) -> torch.Tensor:
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), resample)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)  # (3, size, size) uint8


def fidelity_images(images: list, size: int = 299, resample=None) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) uint8: the largest centred square, resized to ``size`` (``resample``: a PIL
    filter, default bicubic), RGB."""
    from PIL import Image

    resample = Image.Resampling.BICUBIC if resample is None else resample
    return torch.stack([_square(img, size, resample) for img in images])


########################################################################################################################
# the features, batch by batch
########################################################################################################################
def inception_extractor(weights: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """torch-fidelity's ``FeatureExtractorInceptionV3`` (``inception-v3-compat``, the one ``calculate_metrics``
    builds) giving the pool features (FID, KID) and the unbiased logits (IS), in eval mode on ``device``.
    ``weights`` is checked with :func:`inception_weights` first."""
    from torch_fidelity.utils import create_feature_extractor

    path = inception_weights(weights)
    extractor = create_feature_extractor(FEATURE_EXTRACTOR, [FID_LAYER, ISC_LAYER], cuda=False,
                                         feature_extractor_weights_path=str(path), verbose=False)
    return extractor.to(device)


@torch.no_grad()
def inception_features(extractor: torch.nn.Module, images: Sequence) -> dict[str, torch.Tensor]:
    """One batch of PIL images -> ``{FID_LAYER: (N, 2048), ISC_LAYER: (N, 1008)}`` float32 on the CPU, as
    torch-fidelity extracts them (our 299-px preprocessing, uint8, the extractor's own resize and scaling)."""
    device = next(extractor.parameters()).device
    out = extractor(fidelity_images(images).to(device))  # (N, 3, 299, 299) uint8 in
    return {k: v.cpu() for k, v in extractor.convert_features_tuple_to_dict(out).items()}


def concat_features(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-batch feature dicts -> one dict (rows in the order given); no parts -> empty (0, D) tensors."""
    parts = [p for p in parts if p]
    if not parts:
        return {FID_LAYER: torch.zeros(0, 2048), ISC_LAYER: torch.zeros(0, 1008)}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def count(features: dict[str, torch.Tensor] | None) -> int:
    """The number of images behind a feature dict (0 for None or an empty one)."""
    return len(next(iter(features.values()))) if features else 0


def stream_features(extractor: torch.nn.Module, images: Iterable, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """The features of an iterable of PIL images (a list or a lazy generator), ``batch_size`` images at a time:
    only the current batch's images are held here, only the feature vectors are kept."""
    parts, batch = [], []
    for img in images:
        batch.append(img)
        if len(batch) == batch_size:
            parts.append(inception_features(extractor, batch))
            batch = []
    if batch:
        parts.append(inception_features(extractor, batch))
    return concat_features(parts)


########################################################################################################################
# the metrics
########################################################################################################################
def metrics_from_features(fake: dict[str, torch.Tensor], real: dict[str, torch.Tensor] | None = None, *,
                          fid: bool = True, kid: bool = True, isc: bool = True, kid_subset_size: int | None = None,
                          isc_splits: int = 10) -> dict[str, float]:
    """FID and KID of ``fake`` against ``real`` and the Inception Score of ``fake``, from their Inception features
    (:func:`inception_features`), with torch-fidelity's own formulas, subset sampling and seeds.

    Returns the requested ones of ``fid``, ``kid_mean``, ``kid_std``, ``is_mean``, ``is_std``, plus ``n_real`` and
    ``n_fake``. KID subsets and IS splits depend on the row order: keep it fixed (e.g. by record index).
    """
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric

    n_fake, n_real = count(fake), count(real)
    if n_fake < 2 or ((fid or kid) and n_real < 2):
        raise ValueError(f"FID/KID/IS need at least 2 images on each side, got {n_real} real and {n_fake} fake")
    raw: dict[str, float] = {}
    if isc:  # >= 2 images a split (1 gives IS = 1)
        raw.update(isc_featuresdict_to_metric(fake, ISC_LAYER, isc_splits=max(1, min(isc_splits, n_fake // 2)),
                                              verbose=False))
    if fid:
        raw.update(fid_statistics_to_metric(fid_featuresdict_to_statistics(fake, FID_LAYER),
                                            fid_featuresdict_to_statistics(real, FID_LAYER), False))
    if kid:
        raw.update(kid_featuresdict_to_metric(fake, real, FID_LAYER, verbose=False,
                                              kid_subset_size=min(kid_subset_size or 1000, n_real, n_fake)))
    out = {name: float(raw[k]) for k, name in METRIC_NAMES.items() if k in raw}
    out.update(n_real=n_real, n_fake=n_fake)
    return out


def fidelity_metrics(real: Iterable, fake: Iterable, weights: str | os.PathLike, *, fid: bool = True,
                     kid: bool = True, isc: bool = True, kid_subset_size: int | None = None, isc_splits: int = 10,
                     batch_size: int = 32, device: str = "cpu") -> dict[str, float]:
    """FID and KID of ``fake`` against ``real`` and the Inception Score of ``fake`` (PIL images, any sizes).

    ``real`` and ``fake`` may be lists or lazy iterables (generators): they are consumed ``batch_size`` images at a
    time and only the Inception features are kept. Returns the requested ones of ``fid``, ``kid_mean``, ``kid_std``,
    ``is_mean``, ``is_std``, plus ``n_real`` and ``n_fake``. ``weights`` is checked with :func:`inception_weights`
    first.
    """
    need_real = fid or kid
    sizes = [len(x) if hasattr(x, "__len__") else None for x in (real, fake)]
    if (sizes[1] is not None and sizes[1] < 2) or (need_real and sizes[0] is not None and sizes[0] < 2):
        raise ValueError(f"FID/KID/IS need at least 2 images on each side, got {sizes[0]} real and {sizes[1]} fake")
    extractor = inception_extractor(weights, device)
    fake_features = stream_features(extractor, fake, batch_size)
    real_features = stream_features(extractor, real, batch_size) if need_real else None
    out = metrics_from_features(fake_features, real_features, fid=fid, kid=kid, isc=isc,
                                kid_subset_size=kid_subset_size, isc_splits=isc_splits)
    if not need_real:
        out["n_real"] = sizes[0] if sizes[0] is not None else 0
    return out
