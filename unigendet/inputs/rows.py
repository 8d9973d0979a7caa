"""Field-named samples -> typed records: one tar sample (:mod:`unigendet.inputs.tar_shards`) or one table row
(:mod:`unigendet.inputs.tables`) becomes a ``DetectionRecord`` or a ``T2IRecord``, with the same checks and counted
skips as the JSON readers (:mod:`unigendet.inputs.records`).

:class:`Columns` names the fields. A detection sample needs an image, a label and either a FakeClue
``conversations`` list (question + explanation) or nothing more: without one (``conversations: null``, or the field
absent), the answer is the verdict sentence ("This is a fake image.") and the question ``prompt``. A text-to-image
sample needs an image and a caption.

Labels: ``0`` / ``1`` (FakeClue: 0 = fake, 1 = real), or a name (``"fake"``, ``"real"``; any other through
``label_map``); Hugging Face ``ClassLabel`` integers are read through their names (``label_names``, taken from the
dataset's features), so ``["real", "fake"]`` datasets are not silently inverted. In a tar sample the label may be
a ``.cls`` member.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unigendet.constants import DETECTION_PROMPT
from unigendet.inputs import tables
from unigendet.inputs.json_stream import CorpusError
from unigendet.inputs.records import (
    MAX_CAPTION_CHARS,
    MAX_TEXT_CHARS,
    DetectionRecord,
    T2IRecord,
    caption_reason,
    detection_texts,
    read_detection,
    read_t2i,
)
from unigendet.inputs.skips import SkipCounter
from unigendet.inputs.tar_shards import TarSample

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "image")
VERDICTS = {0: "This is a fake image.", 1: "This is a real image."}


@dataclass
class Columns:
    """Which fields of a sample hold what (tar samples: member extensions and the keys of their ``.json``)."""

    image: str = "image"
    """Image column (bytes, or an HF ``{"bytes", "path"}`` struct); in a tar sample, the member extension (e.g.
    ``jpg``), falling back to the first image member."""
    caption: str = "caption"
    """Caption column; in a tar sample the ``.txt`` member, else this key of the ``.json`` member."""
    label: str = "label"
    """Label column (0 = fake / 1 = real, or a name); in a tar sample this key of the ``.json``, or a ``.cls``."""
    conversations: str | None = "conversations"
    """FakeClue conversation column (list of {"from", "value"}); None or absent: verdict-only answers."""
    prompt: str = DETECTION_PROMPT
    """The question of samples without a conversation."""
    label_map: dict[str, int] = field(default_factory=lambda: {"fake": 0, "real": 1})
    """Label names -> 0 (fake) / 1 (real), lowercased (extend it for e.g. ``{"ai": 0, "nature": 1}``)."""
    label_names: list[str] | None = None
    """Names of integer labels (an HF ``ClassLabel``); set by the table reader from the dataset's features."""
    max_text_chars: int = MAX_TEXT_CHARS
    max_caption_chars: int = MAX_CAPTION_CHARS

    def to_label(self, raw: Any) -> int | None:
        if isinstance(raw, (bytes, bytearray)):  # a .cls member
            raw = bytes(raw).decode("utf-8", errors="replace").strip()
            raw = int(raw) if raw.lstrip("-").isdigit() else raw
        if type(raw) is int and self.label_names is not None:
            if not 0 <= raw < len(self.label_names):
                return None
            raw = self.label_names[raw]
        if type(raw) is int:
            return raw if raw in (0, 1) else None
        if isinstance(raw, str):
            return self.label_map.get(raw.strip().lower())
        return None


#####################################################################################################
# Rows
#####################################################################################################


def detection_record(row: dict[str, Any], rid: str, skips: SkipCounter, cols: Columns, *, image: str,
                     blob: bytes | None = None, shard: str | None = None, index: int | None = None,
                     prompt_override: str | None = None) -> DetectionRecord | None:
    """The detection record of one row (``image``: what to show as its image name), or None after a counted skip."""
    label = cols.to_label(row.get(cols.label))
    if label is None:
        skips.skip("bad_label", rid, f"label {row.get(cols.label)!r}")
        return None
    conv = row.get(cols.conversations) if cols.conversations else None
    if conv is None:
        prompt, answer = prompt_override or cols.prompt, VERDICTS[label]
    else:
        texts = detection_texts(conv, rid, skips, prompt_override, cols.max_text_chars)
        if texts is None:
            return None
        prompt, answer = texts
    cate = row.get("cate")
    return DetectionRecord(id=rid, image=image, label=label, prompt=prompt, answer=answer,
                           cate=cate if isinstance(cate, str) else None, shard=shard, row=index, blob=blob)


def t2i_record(row: dict[str, Any], rid: str, skips: SkipCounter, cols: Columns, *, blob: bytes | None = None,
               shard: str | None = None, index: int | None = None) -> T2IRecord | None:
    caption = row.get(cols.caption)
    if isinstance(caption, bytes):
        caption = caption.decode("utf-8", errors="surrogateescape")
    reason = caption_reason(caption, cols.max_caption_chars)
    if reason:
        skips.skip(reason[0], rid, reason[1])
        return None
    return T2IRecord(id=rid, prompt=caption, shard=shard, row=index, blob=blob)


#####################################################################################################
# Tar samples
#####################################################################################################


def tar_row(sample: TarSample, cols: Columns, skips: SkipCounter) -> tuple[dict[str, Any], bytes | None] | None:
    """(fields as a row, the image bytes) of a tar sample: its ``.json`` keys, the ``.txt`` caption and the ``.cls``
    label; None after a counted skip (an unparsable ``.json``)."""
    row: dict[str, Any] = {}
    if "json" in sample.fields:
        try:
            meta = json.loads(sample.fields["json"])
        except (ValueError, UnicodeDecodeError) as e:
            skips.skip("malformed_record", sample.id, f"unparsable .json member: {e}")
            return None
        if not isinstance(meta, dict):
            skips.skip("malformed_record", sample.id, "the .json member is not an object")
            return None
        row.update(meta)
    if "txt" in sample.fields:
        row[cols.caption] = sample.fields["txt"].decode("utf-8", errors="surrogateescape")
    if "cls" in sample.fields and cols.label not in row:
        row[cols.label] = sample.fields["cls"]
    key = cols.image.lower()
    image = sample.fields[key] if key in sample.fields else next(
        (sample.fields[f] for f in IMAGE_FIELDS if f in sample.fields), None)
    return row, image


@dataclass
class TarRecords:
    """A picklable ``TarSample -> record`` converter for one side (``kind``: ``detection`` or ``t2i``)."""

    kind: str
    cols: Columns = field(default_factory=Columns)
    prompt_override: str | None = None
    categories: list[str] | None = None

    def __call__(self, sample: TarSample, skips: SkipCounter):
        got = tar_row(sample, self.cols, skips)
        if got is None:
            return None
        row, image = got
        if image is None:
            skips.skip("missing_file", sample.id, f"no image member among {sorted(sample.fields)}")
            return None
        if self.kind == "t2i":
            return t2i_record(row, sample.id, skips, self.cols, blob=image)
        if self.categories is not None and row.get("cate") not in self.categories:
            return None
        return detection_record(row, sample.id, skips, self.cols, image=sample.key, blob=image,
                                prompt_override=self.prompt_override)


#####################################################################################################
# Tables (HF datasets on disk, Parquet)
#####################################################################################################


def table_columns(path, cols: Columns, *, detection: bool) -> tuple[list, Columns]:
    """The table's files and the columns with the label names its features give; checks the image column."""
    import dataclasses

    files = tables.table_files(path)
    names = tables.column_names(files[0])
    needed = [cols.image, cols.label] if detection else [cols.image, cols.caption]
    missing = [c for c in needed if c not in names]
    if missing:
        raise CorpusError(f"{files[0]} has no column(s) {missing}; its columns are {names} (set the column names)")
    feats = tables.features(path)
    return files, dataclasses.replace(cols, label_names=tables.class_names(feats, cols.label) or cols.label_names)


def read_table_detection(path, skips: SkipCounter, cols: Columns, *, categories=None,
                         prompt_override: str | None = None) -> Iterator[DetectionRecord]:
    """Detection records of a saved HF dataset or Parquet table (images stay in the table until planned)."""
    files, cols = table_columns(path, cols, detection=True)
    wanted = [cols.label, "cate"] + ([cols.conversations] if cols.conversations else [])
    keep = None if categories is None else set(categories)
    for file, i, row in tables.iter_rows(files, wanted, skips):
        if keep is not None and row.get("cate") not in keep:
            continue
        rid = f"{file.name}:{i}"
        rec = detection_record(row, rid, skips, cols, image=rid, shard=str(file), index=i,
                               prompt_override=prompt_override)
        if rec is not None:
            yield rec


def read_table_t2i(path, skips: SkipCounter, cols: Columns) -> Iterator[T2IRecord]:
    files, cols = table_columns(path, cols, detection=False)
    for file, i, row in tables.iter_rows(files, [cols.caption], skips):
        rec = t2i_record(row, f"{file.name}:{i}", skips, cols, shard=str(file), index=i)
        if rec is not None:
            yield rec


def read_corpus(kind: str, path, skips: SkipCounter, cols: Columns, *, categories=None,
                prompt_override: str | None = None) -> Iterator[DetectionRecord] | Iterator[T2IRecord]:
    """The records of a ``detection`` or ``t2i`` corpus that is not tar shards: a saved HF dataset or Parquet table
    (:func:`read_table_detection`; T2I Parquet goes through :func:`~unigendet.inputs.records.read_t2i`, which reads
    its captions leniently shard by shard), or a FakeClue / metadata JSON or JSON Lines file."""
    if kind == "detection":
        if tables.is_table(path):
            return read_table_detection(path, skips, cols, categories=categories, prompt_override=prompt_override)
        return read_detection(path, skips, categories=categories, prompt_override=prompt_override,
                              max_text_chars=cols.max_text_chars)
    if tables.is_hf_saved(path):
        return read_table_t2i(path, skips, cols)
    return read_t2i(path, skips, image_column=cols.image, caption_column=cols.caption,
                    max_caption_chars=cols.max_caption_chars)


def image_source(rec, image_column: str, root=None) -> tuple[Any, Any]:
    """``(source, root)`` to hand to :func:`~unigendet.inputs.images.open_image` for a record's image: its bytes
    (tar samples), its table cell (bytes, a path, or None for a null / damaged cell), or its path under ``root``."""
    if rec.blob is not None:
        return rec.blob, None
    if rec.shard is not None:
        return tables.image_value(tables.load_cell(rec.shard, rec.row, image_column), Path(rec.shard).parent), None
    return rec.image, root
