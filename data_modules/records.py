"""Record readers: FakeClue detection corpora and LAION-style text-to-image corpora -> typed records.

Records carry metadata only (paths, labels, text); pixels are decoded later, in the loader workers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DetectionRecord:
    id: str  # stable and unique within the corpus (e.g. "train.json:17")
    image: str  # path relative to the image root, as written in the record
    label: int  # 0 = fake, 1 = real
    prompt: str  # the first human turn without the <image> tag
    answer: str  # the first gpt turn ("This is a fake image. ...")
    cate: str | None = None


@dataclass(frozen=True)
class T2IRecord:
    id: str
    prompt: str
    image: str | None = None  # metadata corpora: path relative to the metadata file's folder
    shard: str | None = None  # parquet corpora: shard file and row
    row: int | None = None
