"""A bad-input corpus: good records mixed with one record of every bad kind, and what must become of each.

:func:`build_bad_corpus` writes, under one folder,

* ``det/images/``: good images, images that are unusual but usable after normalisation (CMYK, 16-bit, palette with
  transparency, LA, RGBA, EXIF rotation, animated GIF / WebP, 20000x10, a symlink that stays inside), and broken
  ones (truncated JPEG / PNG, zero bytes, text with an image extension, decompression-bomb headers, 1x1, a dangling
  symlink, a symlink out of the root, a folder named like an image);
* ``det/train.jsonl``: a FakeClue detection corpus in JSON Lines (UTF-8 BOM, blank lines, a malformed line, invalid
  UTF-8, bad labels and conversations, escaping paths, ...), and ``det/train.json``: the same records as one JSON
  list (the malformed line becomes a non-object element) cut off in the middle of one more record;
* ``det/t2i.jsonl``: a LAION-style metadata corpus over the same images; ``det/t2i.parquet``: a Parquet shard with
  null / empty / NUL-filled / broken image cells and bad captions;
* ``outside.png``: a good image outside the data root, the target of the escaping paths.

The returned :class:`Manifest` says, per corpus, which record ids must be delivered and which must be skipped with
which reason; and, for ``unigendet detect`` over ``det/images``, which JSON line each file must give.

The expectations come from the documented behaviour (``unigendet/inputs/records.py``, ``unigendet/inputs/images.py``,
``unigendet/inputs/transforms.py`` docstrings), not from running the code:

* normalised, hence delivered: CMYK, ``I;16``, palette + ``transparency``, LA / RGBA (alpha on white), EXIF
  orientation, animated GIF / WebP (first frame), a symlink that resolves inside the root, 20000x10 (short side 10
  >= the 8 px minimum; the transform bounds the long side), a human turn without the ``<image>`` tag (the image's
  place in the sequence is fixed by the planner, the tag is only stripped), a Parquet caption holding NUL
  characters (valid text; only image *paths* with NUL are refused);
* read-time skips (``read_skips``): ``malformed_record``, ``bad_label``, ``empty_conversation``,
  ``bad_conversation``, ``bad_text``, ``text_too_long``, ``path_escapes_root`` for ``..`` and absolute paths;
* decode-time skips (inside the stream): ``missing_file``, ``path_escapes_root`` (symlink out), ``unreadable_image``,
  ``truncated_image``, ``image_too_large``, ``image_too_small`` (1x1 < 8 px), ``too_many_tokens`` (a valid but long
  answer over the per-sample token limit).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DELIVER = "deliver"
N_GOOD = 6  # good detection / T2I records per corpus
QUESTION = "<image>\nDoes the image looks real/fake?"


@dataclass(frozen=True)
class Entry:
    id: str
    """The record id the reader gives it ("train.jsonl:3", "t2i.parquet:5")."""
    kind: str
    """What is wrong with it ("good" for the plain good records)."""
    expect: str
    """``DELIVER``, or the skip reason it must be counted under."""


@dataclass
class Manifest:
    root: Path
    det_jsonl: Path
    det_json: Path
    t2i_jsonl: Path
    t2i_parquet: Path
    images: Path
    """``det/images``: the folder ``unigendet detect`` is run on."""
    corpora: dict[str, list[Entry]] = field(default_factory=dict)
    """Corpus file name -> one entry per record (id order)."""
    detect: dict[str, str | None] = field(default_factory=dict)
    """Path (as given to / listed by ``unigendet detect``) -> ``DELIVER``, an error reason, or None for an entry the
    folder listing leaves out."""
    texts: list[str] = field(default_factory=list)
    """Texts of the good records, to train a tokenizer on."""

    def delivered(self, corpus: str) -> list[str]:
        return [e.id for e in self.corpora[corpus] if e.expect == DELIVER]

    def skips(self, corpus: str) -> Counter:
        return Counter(e.expect for e in self.corpora[corpus] if e.expect != DELIVER)

    def kinds(self) -> set[str]:
        return {e.kind for entries in self.corpora.values() for e in entries if e.kind != "good"}


#####################################################################################################
# Image files
#####################################################################################################


def _noise(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels with almost no data: a bomb that is never allocated."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _chunk(b"IEND", b""))


def _image_files() -> dict[str, tuple[bytes, str]]:
    """File name under ``images/`` -> (bytes, expected: DELIVER or skip reason) for every regular image file."""
    pal = Image.new("P", (32, 24), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (16, 0, 32, 24))
    la = Image.new("LA", (32, 24), (0, 0))
    la.paste((90, 255), (16, 0, 32, 24))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    png = _encode(_noise(48, 40, 100), "PNG")
    jpg = _encode(_noise(96, 64, 101), "JPEG", quality=95)
    files = {f"good_{i}.png": (_encode(_noise(40 + 8 * (i % 3), 40, i), "PNG"), DELIVER) for i in range(N_GOOD)}
    files.update({
        "cmyk.jpg": (_encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95), DELIVER),
        "grey16.png": (_encode(Image.new("I;16", (32, 24), 300 * 257 // 2), "PNG"), DELIVER),
        "palette_transparency.png": (_encode(pal, "PNG", transparency=0), DELIVER),
        "la.png": (_encode(la, "PNG"), DELIVER),
        "rgba.png": (_encode(Image.new("RGBA", (32, 24), (255, 0, 0, 128)), "PNG"), DELIVER),
        "exif_rotated.jpg": (_encode(_noise(48, 24, 7), "JPEG", quality=90, exif=exif.tobytes()), DELIVER),
        "animated.gif": (_encode(red, "GIF", save_all=True, append_images=[blue], duration=50, loop=0), DELIVER),
        "animated.webp": (_encode(red, "WEBP", save_all=True, append_images=[blue], duration=50, lossless=True),
                          DELIVER),
        "wide_20000x10.png": (_encode(_noise(20000, 10, 8), "PNG"), DELIVER),
        "pixel_1x1.png": (_encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), "image_too_small"),
        "truncated.jpg": (jpg[: len(jpg) * 3 // 4], "truncated_image"),  # cut inside the scan data
        "truncated.png": (png[: len(png) // 2], "truncated_image"),
        "zero_bytes.png": (b"", "unreadable_image"),
        "not_an_image.jpg": (b"<html>this is not an image</html>\n" * 20, "unreadable_image"),
        "bomb.png": (crafted_png(100_000, 100_000), "image_too_large"),  # over PIL's own bomb limit
        "over_limit.png": (crafted_png(9_000, 9_000), "image_too_large"),  # 81 Mpx: over ours (64 M), under PIL's
    })
    return files


#####################################################################################################
# Records
#####################################################################################################


def _det(image: str | None = "images/good_0.png", label=0, human=QUESTION, answer=None, **extra) -> dict:
    verdict = "This is a real image." if label == 1 else "This is a fake image."
    rec = {"image": image, "label": label, "cate": "object", "width": 48, "height": 40,
           "conversations": [{"from": "human", "value": human},
                             {"from": "gpt", "value": answer if answer is not None else f"{verdict} Edges repeat."}]}
    if image is None:
        del rec["image"]
    rec.update(extra)
    return rec


def _line(rec: dict) -> bytes:
    return json.dumps(rec).encode()


def _detection_lines(outside: Path, long_answer: str) -> list[tuple[str, bytes, str]]:
    """(kind, JSON Lines line, expected) for the detection corpus, good records interleaved with bad ones."""
    img = {name: f"images/{name}" for name in _image_files()}
    conv = _det()["conversations"]
    bad: list[tuple[str, bytes, str]] = [
        # images: usable after normalisation
        ("cmyk", _line(_det(img["cmyk.jpg"])), DELIVER),
        ("grey16", _line(_det(img["grey16.png"], label=1)), DELIVER),
        ("palette_transparency", _line(_det(img["palette_transparency.png"])), DELIVER),
        ("la", _line(_det(img["la.png"], label=1)), DELIVER),
        ("rgba", _line(_det(img["rgba.png"])), DELIVER),
        ("exif_rotation", _line(_det(img["exif_rotated.jpg"], label=1)), DELIVER),
        ("animated_gif", _line(_det(img["animated.gif"])), DELIVER),
        ("animated_webp", _line(_det(img["animated.webp"])), DELIVER),
        ("wide_20000x10", _line(_det(img["wide_20000x10.png"], label=1)), DELIVER),
        ("symlink_inside", _line(_det("images/link_in.png")), DELIVER),
        ("no_image_tag", _line(_det(human="Does the image looks real/fake?")), DELIVER),
        # images: broken
        ("pixel_1x1", _line(_det(img["pixel_1x1.png"])), "image_too_small"),
        ("truncated_jpeg", _line(_det(img["truncated.jpg"])), "truncated_image"),
        ("truncated_png", _line(_det(img["truncated.png"])), "truncated_image"),
        ("zero_bytes", _line(_det(img["zero_bytes.png"])), "unreadable_image"),
        ("not_an_image", _line(_det(img["not_an_image.jpg"])), "unreadable_image"),
        ("directory_as_image", _line(_det("images/folder.png")), "unreadable_image"),
        ("bomb", _line(_det(img["bomb.png"])), "image_too_large"),
        ("over_pixel_limit", _line(_det(img["over_limit.png"])), "image_too_large"),
        ("missing_file", _line(_det("images/missing.png")), "missing_file"),
        ("dangling_symlink", _line(_det("images/dangling.png")), "missing_file"),
        ("dotdot_escape", _line(_det("../outside.png")), "path_escapes_root"),
        ("dotdot_inner_escape", _line(_det("images/../../outside.png")), "path_escapes_root"),
        ("absolute_path", _line(_det(str(outside))), "path_escapes_root"),
        ("windows_absolute_path", _line(_det("C:\\data\\x.png")), "path_escapes_root"),
        ("symlink_out", _line(_det("images/link_out.png")), "path_escapes_root"),
        # records
        ("malformed_json_line", b'{"image": "images/good_0.png", "label": 0, "conversations": [', "malformed_record"),
        ("missing_image_key", _line(_det(None)), "malformed_record"),
        ("label_2", _line(_det(label=2)), "bad_label"),
        ("label_string_fake", _line(_det(label="fake")), "bad_label"),
        ("label_null", _line(_det(label=None)), "bad_label"),
        ("label_bool", _line(_det(label=True)), "bad_label"),
        ("missing_conversations", _line({"image": "images/good_0.png", "label": 0}), "empty_conversation"),
        ("gpt_turn_first", _line(_det(conversations=conv[::-1])), "bad_conversation"),
        ("unknown_first_role", _line(_det(conversations=[{"from": "system", "value": "x"}, *conv])),
         "bad_conversation"),
        ("conversations_not_a_list", _line(_det(conversations="human: hi")), "bad_conversation"),
        ("no_gpt_answer", _line(_det(conversations=conv[:1])), "empty_conversation"),
        ("empty_answer", _line(_det(answer="   ")), "empty_conversation"),
        ("image_tag_only", _line(_det(human="<image>")), "empty_conversation"),
        ("non_utf8_text", _line(_det(answer="This is a fake image. XX")).replace(b"XX", b"\xff\xfe\xc3("), "bad_text"),
        ("lone_surrogate", _line(_det(answer="This is a fake image. \ud800")), "bad_text"),
        ("answer_1mb", _line(_det(answer="This is a fake image. " + "x" * (1 << 20))), "text_too_long"),
        ("nul_in_path", _line(_det("images/good_0.png\x00.txt")), "bad_text"),
        ("too_many_tokens", _line(_det(answer=long_answer)), "too_many_tokens"),
    ]
    lines = []
    for i in range(max(N_GOOD, len(bad))):  # interleave so every worker shard gets good and bad records
        if i < N_GOOD:
            lines.append(("good", _line(_det(f"images/good_{i}.png", label=i % 2)), DELIVER))
        if i < len(bad):
            lines.append(bad[i])
    return lines


def _t2i_lines(outside: Path) -> list[tuple[str, bytes, str]]:
    def rec(path="images/good_0.png", prompt="a noisy picture"):
        return _line({"image_path": path, "prompt": prompt})

    bad = [
        ("cmyk", rec("images/cmyk.jpg"), DELIVER),
        ("exif_rotation", rec("images/exif_rotated.jpg"), DELIVER),
        ("animated_gif", rec("images/animated.gif"), DELIVER),
        ("grey16", rec("images/grey16.png"), DELIVER),
        ("empty_caption", rec(prompt="  "), "bad_text"),
        ("null_caption", rec(prompt=None), "bad_text"),
        ("caption_not_text", rec(prompt=17), "bad_text"),
        ("non_utf8_caption", rec(prompt="a cat XX").replace(b"XX", b"\xc3\x28\xa0"), "bad_text"),
        ("caption_1mb", rec(prompt="a cat " * (1 << 18)), "text_too_long"),
        ("missing_image_path", _line({"prompt": "a cat"}), "malformed_record"),
        ("malformed_json_line", b'{"image_path": "images/good_0.png", "prompt": "a', "malformed_record"),
        ("dotdot_escape", rec("../outside.png"), "path_escapes_root"),
        ("absolute_path", rec(str(outside)), "path_escapes_root"),
        ("symlink_out", rec("images/link_out.png"), "path_escapes_root"),
        ("missing_file", rec("images/missing.png"), "missing_file"),
        ("truncated_png", rec("images/truncated.png"), "truncated_image"),
        ("zero_bytes", rec("images/zero_bytes.png"), "unreadable_image"),
        ("pixel_1x1", rec("images/pixel_1x1.png"), "image_too_small"),
        ("bomb", rec("images/bomb.png"), "image_too_large"),
    ]
    lines = []
    for i in range(max(N_GOOD, len(bad))):
        if i < N_GOOD:
            lines.append(("good", rec(f"images/good_{i}.png", f"a noisy picture number {i}"), DELIVER))
        if i < len(bad):
            lines.append(bad[i])
    return lines


def _parquet_rows(files: dict[str, tuple[bytes, str]]) -> list[tuple[str, bytes | None, str | None, str]]:
    """(kind, image cell, caption cell, expected) of the Parquet shard."""
    bad = [
        ("cmyk", files["cmyk.jpg"][0], "a red square", DELIVER),
        ("caption_with_nul", files["good_1.png"][0], "a cat\x00 on a mat", DELIVER),
        ("null_image_cell", None, "a cat", "unreadable_image"),
        ("empty_image_cell", b"", "a cat", "unreadable_image"),
        ("nul_bytes_image_cell", b"\x00" * 256, "a cat", "unreadable_image"),
        ("not_an_image_cell", b"GIF89a but not really", "a cat", "unreadable_image"),
        ("truncated_png_cell", files["truncated.png"][0], "a cat", "truncated_image"),
        ("bomb_cell", files["bomb.png"][0], "a cat", "image_too_large"),
        ("pixel_1x1_cell", files["pixel_1x1.png"][0], "a cat", "image_too_small"),
        ("null_caption", files["good_2.png"][0], None, "bad_text"),
        ("blank_caption", files["good_2.png"][0], " \n ", "bad_text"),
        ("caption_1mb", files["good_2.png"][0], "a cat " * (1 << 18), "text_too_long"),
    ]
    rows = []
    for i in range(max(N_GOOD, len(bad))):
        if i < N_GOOD:
            rows.append(("good", files[f"good_{i}.png"][0], f"a noisy picture number {i}", DELIVER))
        if i < len(bad):
            rows.append(bad[i])
    return rows


def _long_answer() -> str:
    """A valid answer (well under the character limit) whose tokens alone exceed any test token budget."""
    words = [f"{w}{i % 97}" for i, w in enumerate(["edge", "fur", "light", "shadow", "texture"] * 300)]
    return "This is a fake image. " + " ".join(words)


#####################################################################################################
# The corpus
#####################################################################################################


def build_bad_corpus(root: str | os.PathLike) -> Manifest:
    """Write the bad-input corpus under ``root`` (created) and return what must become of every record."""
    root = Path(root)
    det = root / "det"
    images = det / "images"
    images.mkdir(parents=True, exist_ok=True)
    outside = root / "outside.png"
    outside.write_bytes(_encode(_noise(40, 40, 99), "PNG"))

    files = _image_files()
    for name, (data, _) in files.items():
        (images / name).write_bytes(data)
    os.symlink(outside, images / "link_out.png")
    os.symlink(images / "good_0.png", images / "link_in.png")
    os.symlink(images / "never_written.png", images / "dangling.png")
    (images / "folder.png").mkdir()

    m = Manifest(root=root, det_jsonl=det / "train.jsonl", det_json=det / "train.json", t2i_jsonl=det / "t2i.jsonl",
                 t2i_parquet=det / "t2i.parquet", images=images)

    # detection: JSON Lines (with a BOM and blank lines, which are not records) ...
    lines = _detection_lines(outside, _long_answer())
    body = b"\xef\xbb\xbf"
    for i, (_, line, _) in enumerate(lines):
        body += line + (b"\n\n   \n" if i == 3 else b"\n")
    m.det_jsonl.write_bytes(body)
    m.corpora[m.det_jsonl.name] = [Entry(f"{m.det_jsonl.name}:{i}", k, e) for i, (k, _, e) in enumerate(lines)]
    # ... and the same records as a JSON list (the malformed line becomes a non-object element), cut off mid-record
    elements = [b'"not a record"' if k == "malformed_json_line" else line for k, line, _ in lines]
    cut = _line(_det("images/good_1.png"))
    m.det_json.write_bytes(b"[\n" + b",\n".join(elements) + b",\n" + cut[: len(cut) // 2])
    m.corpora[m.det_json.name] = [Entry(f"{m.det_json.name}:{i}", k, e) for i, (k, _, e) in enumerate(lines)]
    m.corpora[m.det_json.name].append(Entry(f"{m.det_json.name}:{len(lines)}", "json_list_truncated",
                                            "malformed_record"))

    # text-to-image: metadata JSON Lines over the same images, and a Parquet shard
    t2i = _t2i_lines(outside)
    m.t2i_jsonl.write_bytes(b"".join(line + b"\n" for _, line, _ in t2i))
    m.corpora[m.t2i_jsonl.name] = [Entry(f"{m.t2i_jsonl.name}:{i}", k, e) for i, (k, _, e) in enumerate(t2i)]
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _parquet_rows(files)
    table = pa.table({"image": pa.array([r[1] for r in rows], pa.binary()),
                      "caption": pa.array([r[2] for r in rows], pa.string())})
    pq.write_table(table, m.t2i_parquet, row_group_size=8)
    m.corpora[m.t2i_parquet.name] = [Entry(f"{m.t2i_parquet.name}:{i}", k, e) for i, (k, _, _, e) in enumerate(rows)]

    # unigendet detect over the image folder: opened unconfined (the user names the files), so a symlink out is an
    # ordinary image; a folder is searched, not reported; a missing file named on the command line is reported
    m.detect = {str(images / name): expect for name, (_, expect) in files.items()}
    m.detect[str(images / "link_out.png")] = DELIVER
    m.detect[str(images / "link_in.png")] = DELIVER
    m.detect[str(images / "dangling.png")] = "missing_file"  # a dangling symlink in a folder is reported too
    m.detect[str(images / "missing.png")] = "missing_file"  # named explicitly

    m.texts = [QUESTION, "This is a fake image. Edges repeat.", "This is a real image. Edges repeat."] + [
        f"a noisy picture number {i}" for i in range(N_GOOD)] + ["a red square", "a cat on a mat"]
    return m
