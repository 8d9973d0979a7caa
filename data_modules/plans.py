"""Records -> sequence plans (docs/method.md, "SMSA" and "DIGA"). Runs inside the loader workers: this is where pixels
are decoded.

* ``DetectionPlanner``: [clean VAE image] [ViT image] [prompt] [answer, CE loss], label 0 = fake / 1 = real.
  ``with_vae=False`` drops the VAE split (the "w/o SMSA" ablation, and the authors' demo at inference).
  ``verdict_only=True`` keeps only the answer's first sentence ("This is a fake image.") - used for fresh fakes
  from the generator, whose explanation nobody wrote.
* ``T2IPlanner``: [caption] [noisy VAE image, flow loss]. With probability ``caption_dropout`` the caption split is
  dropped entirely (the unconditional branch CFG needs, as the reference trains it). The raw timestep is drawn here
  from the record's generator (N(0, 1)), so a re-planned record gets the same one. With ``teacher=True`` it also
  returns the DIGA teacher's plan of the same real image: [clean VAE] [forensic prompt naming the caption] [ViT].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from unigendet.inputs.images import open_image
from unigendet.inputs.records import DetectionRecord, T2IRecord
from unigendet.inputs.rows import image_source
from unigendet.inputs.skips import SkipCounter
from unigendet.inputs.tokenizer import Tokenizer
from unigendet.inputs.transforms import ImageTransform
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit

DEFAULT_TEACHER_PROMPT = "This image was described as: {caption}. Does the image look real or fake?"


def first_sentence(answer: str) -> str:
    head, dot, _ = answer.partition(".")
    return head + dot


@dataclass
class DetectionPlanner:
    tokenizer: Tokenizer
    vit: ImageTransform
    vae: ImageTransform
    image_root: Path | None = None
    with_vae: bool = True
    verdict_only: bool = False
    max_pixels: int = 64_000_000
    image_column: str = "image"  # tables: the image column

    def __call__(self, rec: DetectionRecord, g: torch.Generator, skips: SkipCounter) -> SamplePlan | None:
        source, root = image_source(rec, self.image_column, self.image_root)
        img = open_image(source, skips, rec.id, root=root, max_pixels=self.max_pixels)
        if img is None:
            return None
        vit_img = self.vit.apply(img, skips, rec.id)
        if vit_img is None:
            return None
        splits = [VAESplit(image=self.vae(img))] if self.with_vae else []
        answer = first_sentence(rec.answer) if self.verdict_only else rec.answer
        splits += [ViTSplit(vit_img), TextSplit(self.tokenizer.encode(rec.prompt)),
                   TextSplit(self.tokenizer.encode(answer), loss=True)]
        return SamplePlan(splits, label=rec.label, sample_id=rec.id)


@dataclass
class T2IPlanner:
    tokenizer: Tokenizer
    vae: ImageTransform
    root: Path | None = None  # metadata corpora: the metadata file's folder
    caption_dropout: float = 0.1
    teacher: bool = False
    vit: ImageTransform | None = None  # needed for the teacher plan
    teacher_prompt: str = DEFAULT_TEACHER_PROMPT
    image_column: str = "image"
    max_pixels: int = 64_000_000

    def __post_init__(self) -> None:
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.teacher and self.vit is None:
            raise ValueError("the DIGA teacher plan needs the ViT transform")

    def __call__(self, rec: T2IRecord, g: torch.Generator, skips: SkipCounter):
        source, root = image_source(rec, self.image_column, self.root)
        img = open_image(source, skips, rec.id, root=root, max_pixels=self.max_pixels)
        if img is None:
            return None
        target = self.vae.apply(img, skips, rec.id)
        if target is None:
            return None
        drop = bool(torch.rand((), generator=g) < self.caption_dropout)
        timestep = float(torch.randn((), generator=g))
        splits = [] if drop else [TextSplit(self.tokenizer.encode(rec.prompt))]
        student = SamplePlan([*splits, VAESplit(image=target, noisy=True, timestep=timestep)], sample_id=rec.id)
        if not self.teacher:
            return student
        prompt = self.tokenizer.encode(self.teacher_prompt.format(caption=rec.prompt))
        teacher = SamplePlan([VAESplit(image=target), TextSplit(prompt), ViTSplit(self.vit(img))], sample_id=rec.id)
        return {"gen": student, "teacher": teacher}
