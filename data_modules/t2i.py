"""T2IDataModule: LAION-style text-to-image corpora as packed batches: metadata JSON/JSONL, Parquet shards with image
bytes, Hugging Face datasets saved to disk, or WebDataset / img2dataset tar shards (``key.jpg`` + ``key.txt``)."""

from __future__ import annotations

from dataclasses import dataclass

from data_modules.base import StreamDataModule
from data_modules.plans import DEFAULT_TEACHER_PROMPT, T2IPlanner
from data_modules.units import RecordUnits, TarUnits
from unigendet.inputs.images import open_image
from unigendet.inputs.rows import Columns, TarRecords, image_source, read_corpus
from unigendet.inputs.skips import SkipCounter


@dataclass
class T2IFields:
    """The text-to-image settings, shared by :class:`T2IDataModule` and the generation stream of the co-evolution
    data module (:class:`GenStream`)."""

    image_column: str = "image"
    """Parquet / HF dataset column holding the image (LAION: ``jpg`` or ``image``); tar shards: the image member's
    extension (default: the first image member)."""
    caption_column: str = "caption"
    """Parquet / HF dataset column holding the caption (LAION: ``TEXT`` or ``caption``); tar shards: the ``.txt``
    member, else this key of the ``.json`` member."""
    max_caption_chars: int = 2000
    caption_dropout: float = 0.1
    """Probability of dropping the caption split (the unconditional branch for classifier-free guidance)."""
    teacher: bool = False
    """Also yield the DIGA teacher's detection-style plan of each real image (batches become {"gen", "teacher"})."""
    teacher_prompt: str = DEFAULT_TEACHER_PROMPT


@dataclass(eq=False, repr=False)
class T2IDataModule(T2IFields, StreamDataModule):
    """``train`` / ``val`` / ``test``: metadata JSON/JSONL of {"image_path", "prompt"}, a Parquet file, a folder
    of Parquet shards, a saved HF dataset folder, or tar shards (``laion/{00000..41455}.tar``, a folder of
    ``*.tar``)."""

    @property
    def detection(self):
        return None

    @property
    def text_to_image(self) -> T2IDataModule:
        return self

    def columns(self) -> Columns:
        return Columns(image=self.image_column, caption=self.caption_column, max_caption_chars=self.max_caption_chars)

    def records(self, split: str):
        path = self._path(split)
        recs = self.tar_records(split, TarRecords("t2i", self.columns()))
        recs = list(read_corpus("t2i", path, self.read_skips, self.columns()) if recs is None else recs)
        if not recs:
            raise ValueError(f"{path}: no usable text-to-image records (skipped: {dict(self.read_skips.counts)})")
        return recs

    def units(self, split: str) -> RecordUnits | TarUnits:
        tar = self.tar_units(split, TarRecords("t2i", self.columns()))
        return super().units(split) if tar is None else tar

    def record_image(self, split: str, rec, skips: SkipCounter | None = None):
        skips = self.read_skips if skips is None else skips
        path = self._path(split)
        source, root = image_source(rec, self.image_column, path if path.is_dir() else path.parent)
        return open_image(source, skips, rec.id, root=root)

    def planner(self, split: str) -> T2IPlanner:
        path = self._path(split)
        root = path if path.is_dir() else path.parent
        return T2IPlanner(self.tok, self.vae_tf(), root=root,
                          caption_dropout=self.caption_dropout if split == "train" else 0.0,
                          teacher=self.teacher, vit=self.vit_tf() if self.teacher else None,
                          teacher_prompt=self.teacher_prompt, image_column=self.image_column)
