"""Record readers, image decoding and ``inspect-data`` on small real corpora written to tmp_path.

Every bad-record kind of issue 3 is built for real (PIL-written PNG/JPEG/GIF/WebP files, crafted headers, broken
JSON) and must come out as exactly one counted skip of the right reason, while every good record is delivered.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from data_modules.inspect import inspect_data, main_inspect
from unigendet.inputs import json_stream
from unigendet.inputs.images import open_image
from unigendet.inputs.records import CorpusError, read_detection, read_t2i, t2i_image_root
from unigendet.inputs.rows import image_source
from unigendet.inputs.skips import SkipCounter

#####################################################################################################
# Builders
#####################################################################################################


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _noise(w: int = 24, h: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` RGB pixels, with almost no pixel data (a bomb, not allocated)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        _chunk(b"IEND", b"")


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.name


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    """An image root holding every good variant and every bad kind, plus a file outside it."""
    base = tmp_path_factory.mktemp("images")
    root = base / "root"
    good = _noise()
    _save(good, root / "good/rgb.png", "PNG")
    _save(good, root / "good/rgb.jpg", "JPEG", quality=95)
    _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), root / "good/cmyk.jpg", "JPEG", quality=95)
    _save(Image.new("I;16", (16, 8), 128 * 257), root / "good/grey16.png", "PNG")
    pal = Image.new("P", (16, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.paste(1, (8, 0, 16, 8))  # left half index 0 (transparent), right half index 1 (red)
    _save(pal, root / "good/palette.png", "PNG", transparency=0)
    la = Image.new("LA", (16, 8), (0, 0))
    la.paste((0, 255), (8, 0, 16, 8))  # left transparent, right opaque black
    _save(la, root / "good/la.png", "PNG")
    _save(Image.new("RGBA", (16, 8), (255, 0, 0, 128)), root / "good/rgba.png", "PNG")
    exif_img = Image.new("RGB", (40, 20), (0, 0, 255))
    exif_img.paste((255, 0, 0), (0, 0, 20, 20))  # stored: left half red; orientation 6 = rotate 90 deg clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(exif_img, root / "good/exif.jpg", "JPEG", quality=95, exif=exif.tobytes())
    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    _save(red, root / "good/anim.gif", "GIF", save_all=True, append_images=[blue], duration=50, loop=0)
    _save(red, root / "good/anim.webp", "WEBP", save_all=True, append_images=[blue], duration=50, lossless=True)

    jpg, png = (root / "good/rgb.jpg").read_bytes(), (root / "good/rgb.png").read_bytes()
    _write(root / "bad/trunc.jpg", jpg[: len(jpg) // 2])  # cut inside the header tables
    big = io.BytesIO()
    _noise(96, 64).save(big, "JPEG", quality=95)
    _write(root / "bad/trunc_scan.jpg", big.getvalue()[: len(big.getvalue()) * 3 // 4])  # cut inside the scan data
    _write(root / "bad/trunc.png", png[: len(png) // 2])
    _write(root / "bad/empty.png", b"")
    _write(root / "bad/text.png", b"this is not an image at all\n" * 10)
    _write(root / "bad/bomb.png", crafted_png(100_000, 100_000))
    _write(root / "bad/big.png", crafted_png(5_000, 4_000))
    _write(base / "outside.png", png)
    os.symlink(base / "outside.png", root / "bad/link_out.png")
    os.symlink(root / "good/rgb.png", root / "good/link_in.png")  # a symlink that stays inside is fine
    return root


#####################################################################################################
# Images
#####################################################################################################


def _open(root: Path, name: str, **kw):
    skips = SkipCounter()
    return open_image(name, skips, name, root=root, **kw), skips


@pytest.mark.parametrize("name", ["good/rgb.png", "good/rgb.jpg", "good/link_in.png"])
def test_plain_images_decode_to_rgb(image_root, name):
    img, skips = _open(image_root, name)
    assert skips.total == 0 and img.mode == "RGB" and img.size == (24, 16)
    if name.endswith("png"):
        assert np.array_equal(np.asarray(img), np.asarray(_noise()))


def test_modes_become_rgb_with_alpha_on_white(image_root):
    px = {}
    for name in ["cmyk.jpg", "grey16.png", "palette.png", "la.png", "rgba.png"]:
        img, skips = _open(image_root, f"good/{name}")
        assert skips.total == 0 and img.mode == "RGB", name
        px[name] = np.asarray(img).astype(int)
    r, g, b = px["cmyk.jpg"][8, 8]
    assert r > 200 and g < 60 and b < 60  # CMYK (0, 255, 255, 0) is red
    assert (px["grey16.png"] == 128).all()  # 16-bit 128*257 scaled to 8 bits, not clipped to 255
    assert (px["palette.png"][:, :8] == 255).all() and (px["palette.png"][:, 8:] == [255, 0, 0]).all()
    assert (px["la.png"][:, :8] == 255).all() and (px["la.png"][:, 8:] == 0).all()
    assert np.abs(px["rgba.png"] - [255, 127, 127]).max() <= 1  # half-transparent red over white


def test_exif_orientation_is_applied(image_root):
    img, skips = _open(image_root, "good/exif.jpg")
    assert skips.total == 0 and img.size == (20, 40)  # stored 40x20, displayed rotated
    a = np.asarray(img).astype(int)
    top, bottom = a[:20].mean(axis=(0, 1)), a[20:].mean(axis=(0, 1))
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("name", ["good/anim.gif", "good/anim.webp"])
def test_animated_images_give_their_first_frame(image_root, name):
    img, skips = _open(image_root, name)
    assert skips.total == 0 and img.mode == "RGB"
    assert (np.asarray(img) == [255, 0, 0]).all()


@pytest.mark.parametrize(("name", "reason"), [
    ("bad/trunc.jpg", "truncated_image"),
    ("bad/trunc_scan.jpg", "truncated_image"),
    ("bad/trunc.png", "truncated_image"),
    ("bad/empty.png", "unreadable_image"),
    ("bad/text.png", "unreadable_image"),
    ("bad/bomb.png", "image_too_large"),
    ("bad/missing.png", "missing_file"),
    ("bad", "unreadable_image"),  # a folder
    ("../outside.png", "path_escapes_root"),
    ("good/../../outside.png", "path_escapes_root"),
    ("bad/link_out.png", "path_escapes_root"),
])
def test_bad_images_are_counted_skips(image_root, name, reason):
    img, skips = _open(image_root, name)
    assert img is None and dict(skips.counts) == {reason: 1} and skips.examples[reason] == name


def test_absolute_path_is_refused_even_inside_the_root(image_root):
    img, skips = _open(image_root, str(image_root / "good/rgb.png"))
    assert img is None and dict(skips.counts) == {"path_escapes_root": 1}


def test_pixel_limit_is_checked_on_the_header_before_decoding(image_root):
    # 5000x4000 with no pixel data: decoding would report truncation; the header check must come first
    img, skips = _open(image_root, "bad/big.png", max_pixels=1_000_000)
    assert img is None and dict(skips.counts) == {"image_too_large": 1}
    img, skips = _open(image_root, "good/rgb.png", max_pixels=24 * 16)
    assert img is not None and skips.total == 0


@pytest.mark.parametrize("name", ["bad/trunc_scan.jpg", "bad/trunc.png"])
def test_truncation_is_detected_even_if_pil_was_told_to_tolerate_it(image_root, monkeypatch, name):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    img, skips = _open(image_root, name)
    assert img is None and dict(skips.counts) == {"truncated_image": 1}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_bytes_sources(image_root):
    skips = SkipCounter()
    png = (image_root / "good/rgb.png").read_bytes()
    assert np.array_equal(np.asarray(open_image(png, skips, "ok")), np.asarray(_noise()))
    assert open_image(None, skips, "null") is None
    assert open_image(b"", skips, "empty") is None
    assert open_image(b"GIF89a garbage", skips, "junk") is None
    assert open_image(png[:200], skips, "cut") is None
    assert dict(skips.counts) == {"unreadable_image": 3, "truncated_image": 1}


#####################################################################################################
# Detection corpora
#####################################################################################################


def _det(image: str, label=0, human="<image>\nDoes the image look real/fake?", answer="This is a fake image. Fur.",
         **extra) -> dict:
    conv = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return {"image": image, "label": label, "cate": "animal", "conversations": conv, **extra}


def detection_records() -> tuple[list, list[int], dict[str, int]]:
    """(records, indices of the good ones, expected skip counts) covering every record-level bad kind."""
    recs = [
        _det("a/0.png", 0),  # good
        _det("a/1.png", 1, human="Is it real?<image>", answer="This is a real image."),  # good, tag at the end
        _det("a/2.png", 2),  # bad_label
        _det("a/3.png", "fake"),  # bad_label
        _det("a/4.png", None),  # bad_label
        _det("a/5.png", True),  # bad_label (a bool is not a label)
        {"image": "a/6.png", "label": 0},  # empty_conversation: no conversations
        _det("a/7.png") | {"conversations": []},  # empty_conversation
        _det("a/8.png") | {"conversations": [{"from": "human", "value": "<image>Real?"}]},  # empty_conversation
        _det("a/9.png") | {"conversations": [{"from": "gpt", "value": "This is a fake image."},
                                             {"from": "human", "value": "<image>Real?"}]},  # bad_conversation
        _det("a/10.png") | {"conversations": "human: real?"},  # bad_conversation
        _det("a/11.png") | {"conversations": [["human", "x"], ["gpt", "y"]]},  # bad_conversation
        _det("a/12.png", human=42),  # bad_text
        _det("a/13.png", answer=None),  # bad_text
        _det("a/14.png", answer="This is a fake image. \ud800 lone surrogate"),  # bad_text
        _det("../15.png"),  # path_escapes_root
        _det("/etc/16.png"),  # path_escapes_root
        _det("a/../../17.png"),  # path_escapes_root
        _det("a/../18.png", cate="object"),  # good: `..` that stays inside
        [1, 2, 3],  # malformed_record: not an object
        _det(""),  # malformed_record: no image path
        _det("a/21.png", answer="x" * 20_000),  # text_too_long (default limit 16384)
        _det("a/22.png", human="   <image>  "),  # empty_conversation: nothing asked
        _det("a/23.png", 1, answer="This is a real image."),  # good
    ]
    good = [0, 1, 18, 23]
    expected = {"bad_label": 4, "empty_conversation": 4, "bad_conversation": 3, "bad_text": 3,
                "path_escapes_root": 3, "malformed_record": 2, "text_too_long": 1}
    assert len(recs) == len(good) + sum(expected.values())
    return recs, good, expected


def _read_det(path, **kw):
    skips = SkipCounter()
    out = list(read_detection(path, skips, **kw))
    return out, skips


@pytest.mark.parametrize("layout", ["list", "pretty_list", "lines"])
def test_detection_counts_every_bad_record_and_delivers_every_good_one(tmp_path, layout):
    recs, good, expected = detection_records()
    path = tmp_path / "train.json"
    if layout == "lines":
        path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    else:
        path.write_text(json.dumps(recs, indent=2 if layout == "pretty_list" else None))
    out, skips = _read_det(path)
    assert dict(skips.counts) == expected
    assert [r.id for r in out] == [f"train.json:{i}" for i in good]
    first, second = out[0], out[1]
    assert (first.image, first.label, first.cate) == ("a/0.png", 0, "animal")
    assert first.prompt == "Does the image look real/fake?" and first.answer == "This is a fake image. Fur."
    assert second.prompt == "Is it real?" and second.label == 1
    assert out[2].cate == "object"


def test_json_list_is_parsed_incrementally_across_chunk_boundaries(tmp_path, monkeypatch):
    recs, good, expected = detection_records()
    path = tmp_path / "train.json"
    path.write_text(json.dumps(recs, indent=1))
    monkeypatch.setattr(json_stream, "_CHUNK_CHARS", 7)  # every element spans many reads
    out, skips = _read_det(path)
    assert dict(skips.counts) == expected and [r.id for r in out] == [f"train.json:{i}" for i in good]


@pytest.mark.parametrize("cut", ["mid_record", "after_comma", "before_bracket"])
def test_truncated_json_list_yields_what_parsed_and_one_malformed_skip(tmp_path, monkeypatch, cut):
    monkeypatch.setattr(json_stream, "_CHUNK_CHARS", 64)
    recs = [_det(f"a/{i}.png", i % 2) for i in range(6)]
    text = json.dumps(recs)
    ends = [i for i, c in enumerate(text) if text.startswith('}, {"image"', i)]
    cut_at = {"mid_record": ends[4] - 20, "after_comma": ends[3] + 2, "before_bracket": len(text) - 1}[cut]
    path = tmp_path / "cut.json"
    path.write_text(text[:cut_at])
    out, skips = _read_det(path)
    n = 6 if cut == "before_bracket" else 4
    assert [r.id for r in out] == [f"cut.json:{i}" for i in range(n)]
    assert dict(skips.counts) == {"malformed_record": 1}


def test_json_lines_with_broken_lines_and_invalid_utf8(tmp_path):
    good = json.dumps(_det("a/0.png")).encode()
    bad_text = json.dumps(_det("a/1.png", answer="XX")).encode().replace(b"XX", b"\xff\xfe broken")
    bad_struct = json.dumps(_det("a/2.png")).encode().replace(b'"label"', b'\xff"label"')
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([good, b'{"image": "a/x.png", "label": 0, ', bad_text, bad_struct, b"", good]))
    out, skips = _read_det(path)
    assert [r.id for r in out] == ["train.jsonl:0", "train.jsonl:4"]
    assert dict(skips.counts) == {"malformed_record": 2, "bad_text": 1}
    assert skips.examples == {"malformed_record": "train.jsonl:1", "bad_text": "train.jsonl:2"}


def test_category_filter_and_prompt_override(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps([_det("0.png"), _det("1.png", cate="doc"), _det("2.png", 2, cate="doc")]))
    out, skips = _read_det(path, categories={"doc"}, prompt_override="Real or fake?")
    assert [(r.id, r.prompt, r.cate) for r in out] == [("test.json:1", "Real or fake?", "doc")]
    assert dict(skips.counts) == {"bad_label": 1}  # filtered-out records are not skips


def test_unreadable_detection_corpora_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_detection(tmp_path / "nope.json", SkipCounter()))
    for name, data in [("empty.json", b"  \n"), ("text.json", b"image,label\nx.png,0\n"),
                       ("bin.json", b"\x89PNG\r\n\x1a\n...."), ("junk.jsonl", b"{not json\n{nor this\n")]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CorpusError):
            list(read_detection(tmp_path / name, SkipCounter()))
    with pytest.raises(CorpusError):
        list(read_detection(tmp_path, SkipCounter()))


#####################################################################################################
# Text-to-image corpora
#####################################################################################################


def _t2i_rows() -> list[tuple[str | None, bytes | None]]:
    rows = [(f"a photo number {i}", _png_bytes(_noise(16 + 8 * i, 16, seed=i))) for i in range(5)]
    rows.insert(2, ("x" * 1_000_000, rows[0][1]))  # 1 MB caption: text_too_long
    rows.insert(4, (None, rows[0][1]))  # null caption: bad_text
    rows.insert(5, ("   ", rows[0][1]))  # blank caption: bad_text
    return rows


def _write_parquet(path: Path, rows, struct_images: bool = False, row_group_size: int = 2,
                   image_column: str = "image", caption_column: str = "caption") -> None:
    captions = pa.array([c for c, _ in rows], pa.string())
    if struct_images:
        images = pa.array([None if b is None else {"bytes": b, "path": None} for _, b in rows],
                          pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    else:
        images = pa.array([b for _, b in rows], pa.binary())
    pq.write_table(pa.table({image_column: images, caption_column: captions}), path, row_group_size=row_group_size)


def _decode_t2i(path, recs, image_column="image"):
    skips, pixels = SkipCounter(), []
    for r in recs:
        if r.shard is not None:
            img = open_image(image_source(r, image_column)[0], skips, r.id)
        else:
            img = open_image(r.image, skips, r.id, root=t2i_image_root(path))
        pixels.append(None if img is None else np.asarray(img))
    return pixels, skips


@pytest.mark.parametrize("struct_images", [False, True])
def test_parquet_and_jsonl_t2i_give_the_same_prompts_and_pixels(tmp_path, struct_images):
    rows = _t2i_rows()
    rows.append(("a row whose image is null", None))
    meta = tmp_path / "meta" / "captions.jsonl"
    lines = []
    for i, (caption, data) in enumerate(rows):
        name = f"images/{i}.png"
        if data is not None:
            _write(meta.parent / name, data)
        lines.append(json.dumps({"image_path": name, "prompt": caption}))
    meta.write_text("\n".join(lines))
    shard = tmp_path / "shard.parquet"
    _write_parquet(shard, rows, struct_images=struct_images)

    by_layout = {}
    for path in (meta, shard):
        skips = SkipCounter()
        recs = list(read_t2i(path, skips))
        assert dict(skips.counts) == {"text_too_long": 1, "bad_text": 2}
        assert [r.id.split(":")[1] for r in recs] == ["0", "1", "3", "6", "7", "8"]
        pixels, img_skips = _decode_t2i(path, recs)
        by_layout[path.suffix] = ([r.prompt for r in recs], pixels, dict(img_skips.counts))
    (p_json, px_json, sk_json), (p_pq, px_pq, sk_pq) = by_layout[".jsonl"], by_layout[".parquet"]
    assert p_json == p_pq == [c for c, _ in rows if c and c.strip() and len(c) < 1000]
    assert sk_pq == {"unreadable_image": 1}  # null bytes in the Parquet cell
    assert sk_json == {"missing_file": 1}  # the same row as a metadata file: no image file was written
    assert all(np.array_equal(a, b) for a, b in zip(px_json[:-1], px_pq[:-1], strict=True)) and px_pq[-1] is None


def test_parquet_folder_and_configurable_columns(tmp_path):
    rows = [(f"caption {i}", _png_bytes(_noise(8, 8, seed=i))) for i in range(7)]
    folder = tmp_path / "shards"
    folder.mkdir()
    _write_parquet(folder / "part-001.parquet", rows[4:], image_column="jpg", caption_column="TEXT")
    _write_parquet(folder / "part-000.parquet", rows[:4], image_column="jpg", caption_column="TEXT")
    (folder / "notes.txt").write_text("ignored")
    skips = SkipCounter()
    recs = list(read_t2i(folder, skips, image_column="jpg", caption_column="TEXT"))
    assert skips.total == 0
    assert [r.id for r in recs] == [f"part-000.parquet:{i}" for i in range(4)] + \
        [f"part-001.parquet:{i}" for i in range(3)]
    assert [r.prompt for r in recs] == [c for c, _ in rows]
    # random access, backwards and across row groups, returns the right cells
    for r in reversed(recs):
        assert image_source(r, "jpg")[0] == rows[int(r.prompt.split()[1])][1]
    with pytest.raises(CorpusError, match="caption"):
        list(read_t2i(folder, SkipCounter()))  # default column names do not exist


def _scramble_column_chunk(path: Path, group: int, column: int) -> None:
    """Overwrite the first page header of one column chunk (a damaged page, as a bad disk or copy leaves it)."""
    meta = pq.ParquetFile(path).metadata.row_group(group).column(column)
    start = meta.dictionary_page_offset or meta.data_page_offset
    data = bytearray(path.read_bytes())
    for k in range(start, start + 16):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_parquet_image_page_costs_only_its_row_group(tmp_path):
    rows = [(f"caption {i}", _png_bytes(_noise(32, 32, seed=i))) for i in range(6)]
    shard = tmp_path / "damaged.parquet"
    _write_parquet(shard, rows, row_group_size=2)
    _scramble_column_chunk(shard, group=1, column=0)  # the images of rows 2 and 3
    skips = SkipCounter()
    recs = list(read_t2i(shard, skips))  # captions live in another column chunk: all rows are read
    assert len(recs) == 6 and skips.total == 0
    decoded = [open_image(image_source(r, "image")[0], skips, r.id) for r in recs]
    assert [img is not None for img in decoded] == [True, True, False, False, True, True]
    assert dict(skips.counts) == {"unreadable_image": 2}


def test_a_damaged_parquet_caption_page_costs_only_its_row_group(tmp_path):
    rows = [(f"caption {i}", _png_bytes(_noise(8, 8, seed=i))) for i in range(6)]
    shard = tmp_path / "damaged.parquet"
    _write_parquet(shard, rows, row_group_size=2)
    _scramble_column_chunk(shard, group=1, column=1)  # the captions of rows 2 and 3
    skips = SkipCounter()
    recs = list(read_t2i(shard, skips))
    assert [r.row for r in recs] == [0, 1, 4, 5] and [r.prompt for r in recs][-1] == "caption 5"
    assert dict(skips.counts) == {"malformed_record": 2} and skips.examples["malformed_record"] == "damaged.parquet:2"


def test_unreadable_t2i_corpora_raise(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(read_t2i(tmp_path / "missing.parquet", SkipCounter()))
    with pytest.raises(CorpusError):
        list(read_t2i(tmp_path, SkipCounter()))  # no shards
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(CorpusError):
        list(read_t2i(tmp_path / "broken.parquet", SkipCounter()))


#####################################################################################################
# inspect-data
#####################################################################################################


@pytest.fixture
def small_corpus(tmp_path, image_root) -> tuple[Path, Path, Path]:
    tiny = image_root.parent / "tiny"
    _save(Image.new("RGB", (4, 4)), tiny / "4px.png", "PNG")
    recs = [_det("good/rgb.png"), _det("good/exif.jpg", 1), _det("good/anim.gif"),
            _det("bad/missing.png"), _det("bad/trunc.jpg"), _det("good/rgb.png", label=2),
            _det("../tiny/4px.png"), _det("bad/link_out.png")]
    det = tmp_path / "train.json"
    det.write_text(json.dumps(recs))
    shard = tmp_path / "t2i.parquet"
    rows = [("a red square", _png_bytes(Image.new("RGB", (32, 32), (255, 0, 0)))), ("no image", None),
            (None, b"x"), ("a photo", _png_bytes(_noise(40, 30)))]
    _write_parquet(shard, rows)
    return det, image_root, shard


EXPECTED_SKIPS = {"missing_file": 1, "truncated_image": 1, "bad_label": 1, "path_escapes_root": 2,
                  "unreadable_image": 1, "bad_text": 1}


def test_inspect_data_cli_reports_one_json_object(small_corpus, capsys):
    det, root, shard = small_corpus
    code = main_inspect(["--detection", str(det), "--image-root", str(root), "--t2i", str(shard),
                         "--preset", "demo"])
    out, err = capsys.readouterr()
    assert code == 0
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["delivered"] == 3 + 2
    assert report["skipped"] == EXPECTED_SKIPS
    assert report["examples"]["missing_file"] == "train.json:3"
    assert report["examples"]["unreadable_image"] == "t2i.parquet:1"
    assert "rec" in err  # the progress bar went to stderr


def test_inspect_data_with_worker_processes_reports_the_same(small_corpus):
    det, root, shard = small_corpus
    inline = inspect_data(detection=det, image_root=root, t2i=shard, cfg="demo", progress=False, workers=0)
    pooled = inspect_data(detection=det, image_root=root, t2i=shard, cfg="demo", progress=False, workers=2,
                          chunk_size=2)
    assert pooled == inline
    assert inline["skipped"] == EXPECTED_SKIPS and inline["delivered"] == 5


def test_inspect_data_image_too_small_and_limit(small_corpus, tmp_path):
    det, root, _ = small_corpus
    det2 = tmp_path / "tiny.json"
    det2.write_text(json.dumps([_det("tiny/4px.png"), _det("root/good/rgb.png"), _det("root/good/rgb.jpg")]))
    report = inspect_data(detection=det2, image_root=root.parent, cfg="demo", progress=False)
    assert report == {"delivered": 2, "skipped": {"image_too_small": 1}, "examples": {"image_too_small": "tiny.json:0"}}
    assert inspect_data(detection=det, image_root=root, cfg="demo", limit=2, progress=False)["delivered"] == 2


@pytest.mark.parametrize("args", [["--detection", "does/not/exist.json"], ["--t2i", "nope/"], []])
def test_inspect_data_cli_exits_2_when_the_corpus_cannot_be_read(args, capsys):
    assert main_inspect([*args, "--no-progress"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "error" in err


def test_inspect_data_cli_exits_2_for_a_non_json_file(tmp_path, capsys):
    path = tmp_path / "train.json"
    path.write_bytes(b"\x00\x01binary")
    assert main_inspect(["--detection", str(path), "--no-progress"]) == 2
    assert "neither a JSON list nor JSON Lines" in capsys.readouterr().err
