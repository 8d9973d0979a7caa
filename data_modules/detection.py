"""DetectionDataModule: FakeClue-format real/fake corpora as token-budget packed detection batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_modules.base import StreamDataModule, balanced, resolve
from data_modules.plans import DetectionPlanner
from unigendet.inputs.images import open_image
from unigendet.inputs.records import read_detection
from unigendet.inputs.skips import SkipCounter


@dataclass(eq=False, repr=False)
class DetectionDataModule(StreamDataModule):
    """``train`` / ``val`` / ``test``: FakeClue JSON lists or JSON Lines."""

    image_root: str | None = None
    """Folder the records' ``image`` paths are relative to (default: the json file's folder)."""
    balance_labels: bool = False
    """Oversample the minority label of the training split."""
    categories: list[str] | None = None
    """Keep only these ``cate`` values."""
    with_vae: bool = True
    """Put the clean VAE split before the ViT split (SMSA); False is the "w/o SMSA" ablation."""
    prompt: str | None = None
    """Replace every record's question with this prompt."""

    @property
    def detection(self) -> DetectionDataModule:
        return self

    @property
    def text_to_image(self):
        return None

    def records(self, split: str):
        path = self._path(split)
        recs = list(read_detection(path, self.read_skips, image_root=self._root(path), categories=self.categories,
                                   prompt_override=self.prompt))
        if not recs:
            raise ValueError(f"{path}: no usable detection records (skipped: {dict(self.read_skips.counts)})")
        return balanced(recs, self.seed) if split == "train" and self.balance_labels else recs

    def _root(self, path: Path) -> Path:
        return resolve(self.image_root) or path.parent

    def record_image(self, split: str, rec, skips: SkipCounter | None = None):
        return open_image(rec.image, self.read_skips if skips is None else skips, rec.id,
                          root=self._root(self._path(split)))

    def planner(self, split: str) -> DetectionPlanner:
        return DetectionPlanner(self.tok, self.vit_tf(), self.vae_tf(), image_root=self._root(self._path(split)),
                                with_vae=self.with_vae)
