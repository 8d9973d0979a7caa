"""DetectionDataModule: real/fake corpora as token-budget packed detection batches.

Splits may be FakeClue JSON lists or JSON Lines (images under ``image_root``), Hugging Face datasets saved to disk
(``save_to_disk`` folders) or Parquet tables with an image column, or WebDataset tar shards whose samples hold the
image and a ``.json`` with the label and the conversation (see :mod:`unigendet.inputs.rows` for the fields).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_modules.base import StreamDataModule, balanced, resolve
from data_modules.plans import DetectionPlanner
from data_modules.units import RecordUnits, TarUnits
from unigendet.constants import DETECTION_PROMPT
from unigendet.inputs.images import open_image
from unigendet.inputs.rows import Columns, TarRecords, image_source, read_corpus
from unigendet.inputs.skips import SkipCounter


@dataclass(eq=False, repr=False)
class DetectionDataModule(StreamDataModule):
    """``train`` / ``val`` / ``test``: FakeClue JSON / JSONL, a saved HF dataset folder, Parquet file(s), or tar
    shards (``shards/{00000..00099}.tar``, a folder of ``*.tar``)."""

    image_root: str | None = None
    """Folder the records' ``image`` paths are relative to (default: the json file's folder)."""
    balance_labels: bool = False
    """Oversample the minority label of the training split (not for tar shards, which are streamed)."""
    categories: list[str] | None = None
    """Keep only these ``cate`` values."""
    with_vae: bool = True
    """Put the clean VAE split before the ViT split (SMSA); False is the "w/o SMSA" ablation."""
    prompt: str | None = None
    """Replace every record's question with this prompt."""
    image_column: str = "image"
    """Tables: the image column; tar shards: the image member's extension (default: the first image member)."""
    label_column: str = "label"
    """Tables and tar ``.json``: the label field (0 = fake / 1 = real, or a name in ``label_map``)."""
    conversation_column: str | None = "conversations"
    """Tables and tar ``.json``: the FakeClue conversation field; None (or absent): the answer is the verdict."""
    label_map: dict[str, int] | None = None
    """Label names -> 0 (fake) / 1 (real) for tables and tar shards (default ``{"fake": 0, "real": 1}``)."""

    @property
    def detection(self) -> DetectionDataModule:
        return self

    @property
    def text_to_image(self):
        return None

    def columns(self) -> Columns:
        cols = Columns(image=self.image_column, label=self.label_column, conversations=self.conversation_column,
                       prompt=self.prompt or DETECTION_PROMPT)
        if self.label_map is not None:
            cols.label_map = {k.lower(): v for k, v in self.label_map.items()}
        return cols

    def _tar(self) -> TarRecords:
        return TarRecords("detection", self.columns(), self.prompt, self.categories)

    def records(self, split: str):
        path = self._path(split)
        recs = self.tar_records(split, self._tar())
        if recs is None:
            recs = read_corpus("detection", path, self.read_skips, self.columns(), categories=self.categories,
                               prompt_override=self.prompt)
        recs = list(recs)
        if not recs:
            raise ValueError(f"{path}: no usable detection records (skipped: {dict(self.read_skips.counts)})")
        return balanced(recs, self.seed) if split == "train" and self.balance_labels else recs

    def units(self, split: str) -> RecordUnits | TarUnits:
        tar = self.tar_units(split, self._tar())
        if tar is None:
            return super().units(split)
        if self.balance_labels:
            raise ValueError("balance_labels needs an in-memory corpus; tar shards are streamed (write balanced "
                             "shards instead)")
        return tar

    def _root(self, path: Path) -> Path:
        return resolve(self.image_root) or path.parent

    def record_image(self, split: str, rec, skips: SkipCounter | None = None):
        source, root = image_source(rec, self.image_column, self._root(self._path(split)))
        return open_image(source, self.read_skips if skips is None else skips, rec.id, root=root)

    def planner(self, split: str) -> DetectionPlanner:
        return DetectionPlanner(self.tok, self.vit_tf(), self.vae_tf(), image_root=self._root(self._path(split)),
                                with_vae=self.with_vae, image_column=self.image_column)
