"""T2IDataModule: LAION-style text-to-image corpora (metadata JSON/JSONL or Parquet shards) as packed batches."""

from __future__ import annotations

from dataclasses import dataclass

from data_modules.base import StreamDataModule
from data_modules.plans import DEFAULT_TEACHER_PROMPT, T2IPlanner
from unigendet.inputs.images import open_image
from unigendet.inputs.parquet import load_parquet_image_bytes
from unigendet.inputs.records import read_t2i
from unigendet.inputs.skips import SkipCounter


@dataclass
class T2IFields:
    """The text-to-image settings, shared by :class:`T2IDataModule` and the generation stream of the co-evolution
    data module (:class:`GenStream`)."""

    image_column: str = "image"
    """Parquet column holding the image bytes (LAION: ``jpg`` or ``image``)."""
    caption_column: str = "caption"
    """Parquet column holding the caption (LAION: ``TEXT`` or ``caption``)."""
    max_caption_chars: int = 2000
    caption_dropout: float = 0.1
    """Probability of dropping the caption split (the unconditional branch for classifier-free guidance)."""
    teacher: bool = False
    """Also yield the DIGA teacher's detection-style plan of each real image (batches become {"gen", "teacher"})."""
    teacher_prompt: str = DEFAULT_TEACHER_PROMPT


@dataclass(eq=False, repr=False)
class T2IDataModule(T2IFields, StreamDataModule):
    """``train`` / ``val`` / ``test``: metadata JSON/JSONL of {"image_path", "prompt"}, a Parquet file, or a folder
    of Parquet shards."""

    @property
    def detection(self):
        return None

    @property
    def text_to_image(self) -> T2IDataModule:
        return self

    def records(self, split: str):
        path = self._path(split)
        recs = list(read_t2i(path, self.read_skips, image_column=self.image_column,
                             caption_column=self.caption_column, max_caption_chars=self.max_caption_chars))
        if not recs:
            raise ValueError(f"{path}: no usable text-to-image records (skipped: {dict(self.read_skips.counts)})")
        return recs

    def record_image(self, split: str, rec, skips: SkipCounter | None = None):
        skips = self.read_skips if skips is None else skips
        if rec.shard is not None:
            return open_image(load_parquet_image_bytes(rec.shard, rec.row, self.image_column), skips, rec.id)
        path = self._path(split)
        return open_image(rec.image, skips, rec.id, root=path if path.is_dir() else path.parent)

    def planner(self, split: str) -> T2IPlanner:
        path = self._path(split)
        root = path if path.is_dir() else path.parent
        return T2IPlanner(self.tok, self.vae_tf(), root=root,
                          caption_dropout=self.caption_dropout if split == "train" else 0.0,
                          teacher=self.teacher, vit=self.vit_tf() if self.teacher else None,
                          teacher_prompt=self.teacher_prompt, image_column=self.image_column)
