"""What the training module, the callbacks and the evaluation need from a data module, written down.

``data_modules`` implements it (:class:`data_modules.base.StreamDataModule` and its subclasses); nothing in
``unigendet`` imports them. A data module that does not satisfy :class:`TrainingData` (e.g. a plain
``LightningDataModule`` of fixed batches in a benchmark) still trains: :func:`training_data` returns None, the
tokenizer check, data positions in checkpoints and skip counts are off, and what cannot work without it (fresh
fakes, ``detect_images``) is a TypeError saying so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RecordSource(Protocol):
    """One side of the data (detection or text-to-image): its splits' records and their images."""

    val: str | None
    test: str | None

    def split_records(self, split: str) -> Sequence:
        """The records of ``train`` / ``val`` / ``test`` (detection: ``DetectionRecord``; T2I: ``T2IRecord``)."""

    def record_image(self, split: str, rec, skips=None) -> Any:
        """The record's image (PIL), or None when it is unreadable (counted in ``skips``)."""


@runtime_checkable
class DetectionSource(RecordSource, Protocol):
    with_vae: bool
    """The clean VAE split precedes the ViT split (SMSA)."""
    prompt: str | None
    """The question every record is asked instead of its own (None: the records' questions)."""


@runtime_checkable
class TrainingData(Protocol):
    tok: Any
    """The connected ``Tokenizer`` (``tok.path`` is its ``tokenizer.json``); None before :meth:`connect`."""
    cfg: Any
    """The model config it was connected to; None before :meth:`connect`."""

    def connect(self, cfg, tokenizer: str | None = None) -> Any:
        """Fix what only the model knows (image sizes, the tokenizer's special tokens)."""

    def vit_tf(self) -> Any:
        """The ViT image transform."""

    def vae_tf(self) -> Any:
        """The VAE image transform."""

    @property
    def detection(self) -> DetectionSource | None:
        """The detection side (None: text-to-image data only)."""

    @property
    def text_to_image(self) -> RecordSource | None:
        """The text-to-image side (None: detection data only)."""

    def record_train_batch(self, batch) -> None:
        """Called with every training batch once it is trained on: the data position a checkpoint saves."""

    def train_progress(self) -> Any:
        """The training stream's position, for a checkpoint."""

    def resume_train_progress(self, ranks: list) -> bool:
        """Restore the position from a checkpoint's per-rank progress (``ranks[r]``: what rank r saved). True: this
        rank's own position was restored (same layout), and so may the loader states be; False: the pass was
        resharded over this layout and the checkpoint's loader states do not apply."""

    def skip_metrics(self, batch) -> dict[str, int]:
        """``data/skipped/<reason>`` counts, for the training logs."""


def training_data(trainer) -> TrainingData | None:
    """The trainer's data module when it satisfies :class:`TrainingData`, else None."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    return dm if isinstance(dm, TrainingData) else None
