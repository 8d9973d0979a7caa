"""DetectionDataModule: FakeClue-format real/fake corpora as token-budget packed detection batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_modules.base import StreamDataModule, balanced, resolve
from data_modules.plans import DetectionPlanner
from data_modules.records import read_detection


@dataclass(eq=False, repr=False)
class DetectionDataModule(StreamDataModule):
    train: str | None = None
    """FakeClue JSON list or JSON Lines of the training split."""
    val: str | None = None
    """Validation split (same format); evaluated in one pass, in file order."""
    test: str | None = None
    """Test split (same format)."""
    image_root: str | None = None
    """Folder the records' ``image`` paths are relative to (default: the json file's folder)."""
    tokenizer: str = "tokenizer.json"
    """``tokenizer.json`` (or a folder holding it) whose special tokens match the model's."""
    token_budget: int = 4096
    """Tokens per packed batch."""
    max_sample_tokens: int | None = None
    """Samples longer than this are skipped and counted (default: the budget)."""
    packs_per_epoch: int | None = None
    """Packed batches per rank per loader epoch (default: about one pass over the records)."""
    num_workers: int = 2
    """DataLoader worker processes; records are sharded over (rank, worker)."""
    seed: int = 0
    """Shuffling and per-record randomness."""
    balance_labels: bool = False
    """Oversample the minority label of the training split."""
    categories: list[str] | None = None
    """Keep only these ``cate`` values."""
    with_vae: bool = True
    """Put the clean VAE split before the ViT split (SMSA); False is the "w/o SMSA" ablation."""
    prompt: str | None = None
    """Replace every record's question with this prompt."""
    vit_min_side: int | None = None
    """Image side bounds for the ViT and the VAE (None: BAGEL's 224..980 / 512..1024, scaled to the preset)."""
    vit_max_side: int | None = None
    vae_min_side: int | None = None
    vae_max_side: int | None = None

    def records(self, split: str):
        path = {"train": self.train, "val": self.val, "test": self.test}[split]
        if path is None:
            raise ValueError(f"{type(self).__name__} has no {split} split configured")
        path = Path(path)
        recs = list(read_detection(path, self.read_skips, image_root=self._root(path), categories=self.categories,
                                   prompt_override=self.prompt))
        if not recs:
            raise ValueError(f"{path}: no usable detection records (skipped: {dict(self.read_skips.counts)})")
        return balanced(recs, self.seed) if split == "train" and self.balance_labels else recs

    def _root(self, path: Path) -> Path:
        return resolve(self.image_root) or path.parent

    def planner(self, split: str) -> DetectionPlanner:
        path = Path({"train": self.train, "val": self.val, "test": self.test}[split])
        return DetectionPlanner(self.tok, self.vit_tf(), self.vae_tf(), image_root=self._root(path),
                                with_vae=self.with_vae)

    def train_dataloader(self):
        return self.loader(self.stream("train", budget=self.token_budget, packs_per_epoch=self.packs_per_epoch))

    def val_dataloader(self):
        return self.loader(self.stream("val", budget=self.token_budget, packs_per_epoch=None, one_pass=True))

    def test_dataloader(self):
        return self.loader(self.stream("test", budget=self.token_budget, packs_per_epoch=None, one_pass=True))
