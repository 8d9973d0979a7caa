"""Record readers: FakeClue detection corpora and LAION-style text-to-image corpora -> typed records.

Records carry metadata only (paths, labels, text); pixels are decoded later, in the loader workers
(:func:`unigendet.inputs.images.open_image`).

Features:

* **Streaming, memory-light.** JSON Lines are read line by line; a JSON list (FakeClue's ``train.json``) is parsed
  element by element with :meth:`json.JSONDecoder.raw_decode` over a sliding buffer, so a 100k-record file never
  sits in memory as one Python list. Parquet captions are read in batches; image bytes are read later, one cell at a
  time (:func:`unigendet.inputs.rows.image_source`).
* **Every bad record is a counted skip, never an exception.** The reason (see ``skips.REASONS``) goes to the
  :class:`~unigendet.inputs.skips.SkipCounter`. The first failing check decides the reason, in this order:
  ``malformed_record`` (unparsable JSON line, non-object element, missing image path), ``bad_label``,
  ``empty_conversation`` / ``bad_conversation``, ``bad_text`` (not a string, or undecodable: invalid UTF-8 bytes or
  lone surrogates), ``text_too_long``, ``path_escapes_root``.
* **A JSON list cut off mid-file** (or corrupt from some point on) yields every record before the damage and counts
  the rest as ONE ``malformed_record`` (the number of lost records cannot be known).
* **Only an unreadable corpus raises**: a missing file (:class:`FileNotFoundError`) or a file that is not JSON /
  JSON Lines / Parquet, an empty file, a folder without ``*.parquet`` shards, or Parquet shards without the
  configured columns (:class:`CorpusError`).
* **Stable ids** ``"<file name>:<index>"``: the index counts the elements of a JSON list or the non-blank lines of a
  JSON Lines file (so the same content in either form gets the same ids), or the row within a Parquet shard.
"""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unigendet.inputs.json_stream import CorpusError, iter_json_records
from unigendet.inputs.parquet import is_parquet, iter_parquet_captions
from unigendet.inputs.skips import SkipCounter

log = logging.getLogger("unigendet.data")


@dataclass(frozen=True)
class DetectionRecord:
    id: str  # stable and unique within the corpus (e.g. "train.json:17")
    image: str  # path relative to the image root, as written in the record
    label: int  # 0 = fake, 1 = real
    prompt: str  # the first human turn without the <image> tag
    answer: str  # the first gpt turn ("This is a fake image. ...")
    cate: str | None = None
    shard: str | None = None  # tabular corpora (Parquet, Arrow): the file and row holding the image
    row: int | None = None
    blob: bytes | None = field(default=None, repr=False)  # tar shards: the encoded image itself


@dataclass(frozen=True)
class T2IRecord:
    id: str
    prompt: str
    image: str | None = None  # metadata corpora: path relative to the metadata file's folder
    shard: str | None = None  # parquet corpora: shard file and row
    row: int | None = None
    blob: bytes | None = field(default=None, repr=False)  # tar shards: the encoded image itself


#####################################################################################################
# Limits and vocabulary
#####################################################################################################

MAX_TEXT_CHARS = 16_384  # detection prompt / answer
MAX_CAPTION_CHARS = 4_096  # T2I caption (LAION captions are a few hundred characters)
_HUMAN = ("human", "user")
_GPT = ("gpt", "assistant")
_IMAGE_TAG = "<image>"


#####################################################################################################
# Field checks (each returns a skip reason or None)
#####################################################################################################


def _undecodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: invalid UTF-8 bytes in the file, or "\ud800" escapes
        return True
    return False


def _text_reason(text: Any, max_chars: int) -> tuple[str, str] | None:
    if not isinstance(text, str):
        return "bad_text", f"text is a {type(text).__name__}"
    if _undecodable(text):
        return "bad_text", "text is not valid UTF-8"
    if len(text) > max_chars:
        return "text_too_long", f"{len(text)} characters > {max_chars}"
    return None


def _path_reason(image: Any) -> tuple[str, str] | None:
    if not isinstance(image, str) or not image.strip():
        return "malformed_record", "no image path"
    if "\x00" in image or _undecodable(image):
        return "bad_text", "image path is not valid text"
    if posixpath.isabs(image) or os.path.isabs(image) or (image[:1].isalpha() and image[1:3] in (":/", ":\\")):
        return "path_escapes_root", f"absolute image path {image!r}"
    norm = posixpath.normpath(image.replace("\\", "/"))
    if norm == ".." or norm.startswith("../"):
        return "path_escapes_root", f"image path {image!r} leaves the root"
    return None


def strip_image_tag(text: str) -> str:
    """Remove FakeClue's ``<image>`` placeholder (and the newline around it) from a human turn."""
    return text.replace(_IMAGE_TAG + "\n", "").replace("\n" + _IMAGE_TAG, "").replace(_IMAGE_TAG, "").strip()


def _conversation(conv: Any, max_chars: int) -> tuple[str, str] | tuple[str, str, str]:
    """``("ok", prompt, answer)`` or ``(reason, detail)`` for a FakeClue ``conversations`` field."""
    if conv is None or conv == []:
        return "empty_conversation", "no conversation"
    if not isinstance(conv, list):
        return "bad_conversation", f"conversations is a {type(conv).__name__}"
    for turn in conv:
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            return "bad_conversation", "a turn is not an object with a 'from' role"
    first = conv[0]["from"].lower()
    if first in _GPT:
        return "bad_conversation", "the first turn is the answer (gpt), not the question"
    if first not in _HUMAN:
        return "bad_conversation", f"unknown role {conv[0]['from']!r}"
    answer_turn = next((t for t in conv[1:] if t["from"].lower() in _GPT), None)
    if answer_turn is None:
        return "empty_conversation", "no gpt answer"
    for text in (conv[0].get("value"), answer_turn.get("value")):
        reason = _text_reason(text, max_chars)
        if reason:
            return reason
    prompt, answer = strip_image_tag(conv[0]["value"]), answer_turn["value"].strip()
    if not answer:
        return "empty_conversation", "empty gpt answer"
    return "ok", prompt, answer


#####################################################################################################
# Detection corpora (FakeClue)
#####################################################################################################


def read_detection(path: str | os.PathLike, skips: SkipCounter, *, image_root: str | os.PathLike | None = None,
                   categories: Iterable[str] | None = None, prompt_override: str | None = None,
                   max_text_chars: int = MAX_TEXT_CHARS) -> Iterator[DetectionRecord]:
    """Stream the records of a FakeClue detection corpus (a JSON list or JSON Lines file).

    Args:
        path: the JSON / JSONL file.
        skips: receives one counted skip per bad record.
        image_root: unused by the reader (records keep the relative path); accepted so callers can pass one set of
            corpus options. Images are resolved under it by :func:`unigendet.inputs.images.open_image`.
        categories: keep only records whose ``cate`` is in this set (records filtered out are not skips).
        prompt_override: replaces every record's prompt (the human turn), e.g. a fixed forensic question.
        max_text_chars: a prompt or answer longer than this is a ``text_too_long`` skip.

    Yields:
        One :class:`DetectionRecord` per valid record, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusError: the file is not a JSON list / JSON Lines file at all.
    """
    del image_root
    keep = None if categories is None else set(categories)
    for rid, rec in iter_json_records(path, skips):
        if keep is not None and rec.get("cate") not in keep:
            continue
        label = rec.get("label")
        if type(label) is not int or label not in (0, 1):  # bools, strings, floats, 2, null are all bad
            skips.skip("bad_label", rid, f"label {label!r}")
            continue
        texts = detection_texts(rec.get("conversations"), rid, skips, prompt_override, max_text_chars)
        if texts is None:
            continue
        image = rec.get("image")
        reason = _path_reason(image)
        if reason:
            skips.skip(reason[0], rid, reason[1])
            continue
        cate = rec.get("cate")
        yield DetectionRecord(id=rid, image=image, label=label, prompt=texts[0], answer=texts[1],
                              cate=cate if isinstance(cate, str) else None)


def detection_texts(conversations: Any, rid: str, skips: SkipCounter, prompt_override: str | None = None,
                    max_text_chars: int = MAX_TEXT_CHARS) -> tuple[str, str] | None:
    """(prompt, answer) of a FakeClue ``conversations`` field, or None after counting why it is unusable."""
    conv = _conversation(conversations, max_text_chars)
    if conv[0] != "ok":
        skips.skip(conv[0], rid, conv[1])
        return None
    _, prompt, answer = conv
    if prompt_override is not None:
        prompt = prompt_override
    elif not prompt:
        skips.skip("empty_conversation", rid, "empty human turn")
        return None
    return prompt, answer


#####################################################################################################
# Text-to-image corpora (metadata JSON/JSONL or Parquet shards)
#####################################################################################################


def t2i_image_root(path: str | os.PathLike) -> Path:
    """The folder that a metadata corpus's ``image_path`` entries are relative to (the metadata file's folder)."""
    return Path(path).parent


def caption_reason(caption: Any, max_chars: int) -> tuple[str, str] | None:
    if caption is None or (isinstance(caption, str) and not caption.strip()):
        return "bad_text", "empty caption"
    return _text_reason(caption, max_chars)


def read_t2i(path: str | os.PathLike, skips: SkipCounter, *, image_column: str = "image",
             caption_column: str = "caption", max_caption_chars: int = MAX_CAPTION_CHARS) -> Iterator[T2IRecord]:
    """Stream the records of a text-to-image corpus.

    Three layouts: a metadata JSON list / JSON Lines file of ``{"image_path": ..., "prompt": ...}`` (paths relative to
    the file's folder, see :func:`t2i_image_root`), one Parquet file, or a folder of Parquet shards (``*.parquet``,
    sorted by name; :mod:`unigendet.inputs.parquet`). Parquet records hold ``shard`` and ``row`` only: the image
    bytes are read later with :func:`unigendet.inputs.rows.image_source`, so reading the corpus
    touches nothing but the caption column.

    Args:
        path: metadata file, Parquet file or folder of Parquet shards.
        skips: receives one counted skip per bad record.
        image_column: Parquet column with the image (raw bytes or a ``{"bytes": ...}`` struct, as LAION/HF write).
        caption_column: Parquet column with the caption.
        max_caption_chars: a longer caption is a ``text_too_long`` skip.

    Yields:
        One :class:`T2IRecord` per valid record.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusError: not JSON / JSON Lines / Parquet, no shards in the folder, or a shard lacks a configured column.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist")
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise CorpusError(f"{path} holds no *.parquet shards")
        yield from _parquet_records(shards, skips, image_column, caption_column, max_caption_chars,
                                    lenient=len(shards) > 1)
    elif is_parquet(path):
        yield from _parquet_records([path], skips, image_column, caption_column, max_caption_chars, lenient=False)
    else:
        for rid, rec in iter_json_records(path, skips):
            prompt = rec.get("prompt")
            reason = caption_reason(prompt, max_caption_chars) or _path_reason(rec.get("image_path"))
            if reason:
                skips.skip(reason[0], rid, reason[1])
                continue
            yield T2IRecord(id=rid, prompt=prompt, image=rec["image_path"])


def open_t2i_images(path: str | os.PathLike, skips: SkipCounter) -> list[tuple[str, Any]]:
    """(prompt, RGB ``PIL.Image``) of every record of a text-to-image metadata file (:func:`read_t2i`) whose image
    decodes; bad records and unreadable images are counted in ``skips``. Small corpora only: every image is held."""
    from unigendet.inputs.images import open_image

    root = t2i_image_root(path)
    pairs = ((rec.prompt, open_image(rec.image, skips, rec.id, root=root)) for rec in read_t2i(path, skips))
    return [(prompt, img) for prompt, img in pairs if img is not None]


def _parquet_records(shards: list[Path], skips: SkipCounter, image_column: str, caption_column: str, max_chars: int,
                     lenient: bool) -> Iterator[T2IRecord]:
    for rid, caption, shard, row in iter_parquet_captions(shards, skips, image_column, caption_column,
                                                          lambda c: caption_reason(c, max_chars), lenient):
        yield T2IRecord(id=rid, prompt=caption, shard=shard, row=row)
