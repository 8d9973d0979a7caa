"""The embedded demo corpus: real photo crops, four families of fakes, explanations, captions and a tokenizer.

``unigendet demo-data --out DIR`` (:func:`main_demo_data`) or :func:`build_demo_corpus` writes, deterministically
from a seed (same seed -> byte-identical files):

* ``DIR/detection/{train,val,test}.json`` - FakeClue records (``image`` relative to ``DIR/detection/``, ``label`` 0
  fake / 1 real, ``cate`` = family, ``width``, ``height``, ``conversations``), images under ``detection/images/``;
* ``DIR/t2i/{train,val,test}.jsonl`` - ``{"image_path", "prompt"}`` with paths relative to ``DIR/t2i/`` (copies of
  the real images) and captions;
* ``DIR/tokenizer.json`` - a byte-level BPE trained on all the corpus text: 2044 ordinary tokens, then
  ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>`` at ids 2044..2047 (the ``demo`` preset);
* ``DIR/README.md`` and ``DIR/manifest.json`` (seed, counts, sizes, library versions).

Features:

* Real images are crops (32-48 px per side, multiples of 8, non-square too) of the photographs shipped inside
  scikit-image (``skimage.data``, no download), at random zooms and resampling filters, mirrored.
* Held-out splits never share pixels with train: every source photo is cut into a 2x2..3x3 grid of cells, a hash of
  (photo, cell) sends one cell to test, one to val and the rest to train, and every crop (real, or the real content
  of a fake) comes from a cell of its own split. T2I captions name the cell, so test prompts never occur in train.
* Fakes come from :mod:`unigendet.demo.fakes`; explanations and captions from :mod:`unigendet.demo.explain`, written
  from measurements of each image.
* Every image has its own ``numpy`` generator seeded by (seed, family, index): no global state, any order.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unigendet.demo import explain as ex
from unigendet.demo import fakes
from unigendet.demo import measure as ms
from unigendet.inputs.tokenizer import SPECIAL_TOKENS, train_bpe

SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
VOCAB_SIZE = 2048  # the demo preset's vocabulary: ordinary tokens first, the special tokens last
SIDE_STEP = 8  # 8x8 pixels per VAE token in the demo preset (pixel AE 4x, latent patch 2); two ViT patches of 4
MIN_CROP_STD = 0.03  # crops flatter than this (black retina corners, empty sky) are re-drawn
FULL = {"n_real": 4000, "n_fake_per_family": 1000}
SIZE_RANGE = (32, 48)  # px per side: small images, so the demo sees many of them in its minutes on 2 cores
SMALL = {"n_real": 40, "n_fake_per_family": 10}


@dataclass(frozen=True)
class Source:
    name: str  # skimage.data function (stereo_motorcycle is split into its left and right views)
    group: str  # photos that show the same scene share the cell -> split assignment
    subjects: tuple[str, ...]  # caption / explanation subjects (unique to the group)
    kind: str  # "photo", "micrograph", ...
    texture: bool  # orientation-free content: vertical flips allowed
    weight: float = 1.0


SOURCES = (
    Source("astronaut", "astronaut", ("an astronaut in a white spacesuit", "the portrait of an astronaut",
                                      "a smiling astronaut in front of a flag"), "photo", False, 1.5),
    Source("chelsea", "chelsea", ("a tabby cat's face", "a ginger cat with striped fur", "a cat looking aside"),
           "photo", False, 1.5),
    Source("coffee", "coffee", ("a cup of coffee on a saucer", "a coffee cup with a spoon", "a cup of coffee on a "
                                "table"), "photo", False, 1.5),
    Source("rocket", "rocket", ("a rocket on its launch pad", "a rocket and its launch tower", "a rocket under a "
                                "blue sky"), "photo", False, 1.5),
    Source("motorcycle_left", "motorcycle", ("a motorcycle in a workshop", "a parked motorbike", "a motorcycle next "
                                             "to tools"), "photo", False, 0.75),
    Source("motorcycle_right", "motorcycle", ("a motorcycle in a workshop", "a parked motorbike", "a motorcycle next "
                                              "to tools"), "photo", False, 0.75),
    Source("hubble_deep_field", "hubble", ("distant galaxies in the Hubble deep field", "faint galaxies on a black "
                                           "sky", "a deep-space field of galaxies"), "telescope image", True, 1.5),
    Source("retina", "retina", ("the retina of a human eye", "blood vessels at the back of an eye", "a retinal "
                                "fundus"), "fundus photo", True, 1.5),
    Source("immunohistochemistry", "ihc", ("stained tissue under a microscope", "cells stained brown and blue",
                                           "an immunohistochemistry slide"), "micrograph", True, 1.5),
    Source("camera", "camera", ("a cameraman with a tripod", "a man operating a film camera", "a photographer in a "
                                "park"), "photo", False),
    Source("moon", "moon", ("the surface of the moon", "lunar craters", "the cratered lunar surface"), "photo", True),
    Source("coins", "coins", ("old coins on a table", "a set of historic coins", "rows of coins"), "photo", False),
    Source("brick", "brick", ("a brick wall", "bricks and mortar", "a wall of weathered bricks"), "texture photo",
           True),
    Source("grass", "grass", ("a patch of grass", "blades of grass", "a dense lawn"), "texture photo", True),
    Source("gravel", "gravel", ("gravel stones", "a gravel path", "small pebbles"), "texture photo", True),
    Source("clock", "clock", ("a wall clock", "a clock face", "an analogue clock"), "photo", False),
    Source("cell", "cell", ("a living cell under a microscope", "a cell seen in phase contrast", "a cell and its "
                            "membrane"), "micrograph", True),
)


@dataclass(frozen=True)
class Cell:
    source: int  # index into SOURCES
    split: str
    box: tuple[int, int, int, int]  # y0, x0, y1, x1 in the source photo
    position: str  # "upper left", "centre", ...


########################################################################################################################
# Sources, cells and crops


def load_sources() -> list[np.ndarray]:
    """The photographs of :data:`SOURCES` as uint8 ``(H, W, 3)`` arrays (grayscale photos replicated to RGB)."""
    from skimage import data

    out = []
    for src in SOURCES:
        if src.name.startswith("motorcycle"):
            left, right, _ = data.stereo_motorcycle()
            img = left if src.name.endswith("left") else right
        else:
            img = getattr(data, src.name)()
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        out.append(np.ascontiguousarray(img[..., :3].astype(np.uint8)))
    return out


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def make_cells(photos: list[np.ndarray]) -> list[Cell]:
    """Cut every photo into a grid of cells and assign each cell to a split by a hash of (group, row, col)."""
    cells = []
    for si, (src, img) in enumerate(zip(SOURCES, photos, strict=True)):
        h, w = img.shape[:2]
        rows, cols = min(3, max(2, h // 150)), min(3, max(2, w // 150))
        row_names = ("upper", "lower") if rows == 2 else ("upper", "middle", "lower")
        col_names = ("left", "right") if cols == 2 else ("left", "centre", "right")
        ys, xs = np.linspace(0, h, rows + 1).astype(int), np.linspace(0, w, cols + 1).astype(int)
        keys = sorted(((r, c) for r in range(rows) for c in range(cols)), key=lambda rc: _hash(f"{src.group}:{rc}"))
        split_of = {rc: "test" if k == 0 else "val" if k == 1 else "train" for k, rc in enumerate(keys)}
        for r in range(rows):
            for c in range(cols):
                pos = f"{row_names[r]} {col_names[c]}".replace("middle centre", "centre")
                cells.append(Cell(si, split_of[(r, c)], (int(ys[r]), int(xs[c]), int(ys[r + 1]), int(xs[c + 1])), pos))
    return cells


def sample_size(rng: np.random.Generator, size_range: tuple[int, int]) -> tuple[int, int]:
    """(height, width), multiples of :data:`SIDE_STEP` within ``size_range``; a third of them square."""
    sides = np.arange(size_range[0], size_range[1] + 1, SIDE_STEP)
    h = int(rng.choice(sides))
    return (h, h) if rng.random() < 1 / 3 else (h, int(rng.choice(sides)))


class CropSampler:
    """Draws real crops of a given split: source (by weight), cell, size, zoom, position, resampling filter, flips."""

    def __init__(self, photos: list[np.ndarray], cells: list[Cell], size_range: tuple[int, int]):
        self.photos, self.size_range = photos, size_range
        self.cells = {s: [c for c in cells if c.split == s] for s in SPLITS}
        weights = np.array([SOURCES[i].weight for i in range(len(SOURCES))])
        self.source_p = weights / weights.sum()

    def pick_cell(self, split: str, rng: np.random.Generator, source: int | None = None) -> Cell:
        si = int(rng.choice(len(SOURCES), p=self.source_p)) if source is None else source
        group = SOURCES[si].group
        options = [c for c in self.cells[split] if SOURCES[c.source].group == group]
        cell = options[int(rng.integers(len(options)))]
        return Cell(si, cell.split, cell.box, cell.position)  # stereo pair: same cells for both views

    def crop(self, cell: Cell, rng: np.random.Generator, hw: tuple[int, int] | None = None):
        """A crop from ``cell``: (uint8 image, zoom). Flat crops are re-drawn up to 30 times."""
        y0, x0, y1, x1 = cell.box
        ch, cw = y1 - y0, x1 - x0
        hw = hw or sample_size(rng, self.size_range)
        h, w = min(hw[0], ch // SIDE_STEP * SIDE_STEP), min(hw[1], cw // SIDE_STEP * SIDE_STEP)
        photo, src = self.photos[cell.source], SOURCES[cell.source]
        for _ in range(30):
            zmax = min(ch / h, cw / w)
            zoom = float(np.exp(rng.uniform(0.0, np.log(zmax)))) if zmax > 1 else 1.0
            sh, sw = min(ch, int(round(h * zoom))), min(cw, int(round(w * zoom)))
            oy, ox = y0 + int(rng.integers(0, ch - sh + 1)), x0 + int(rng.integers(0, cw - sw + 1))
            patch = np.ascontiguousarray(photo[oy : oy + sh, ox : ox + sw])
            resample = [Image.BOX, Image.BILINEAR, Image.LANCZOS][int(rng.integers(3))]
            img = fakes.resize(patch, (h, w), resample)
            if rng.random() < 0.5:
                img = img[:, ::-1]
            if src.texture and rng.random() < 0.5:
                img = img[::-1]
            if (img.astype(np.float64) @ ms._LUMA).std() / 255.0 >= MIN_CROP_STD:
                break
        return fakes.camera_noise(np.ascontiguousarray(img), rng), zoom


########################################################################################################################
# Building


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _allocate(n: int) -> list[str]:
    """Split of each of ``n`` items: the first 80% train, then val, then test (at least one of each when n >= 3)."""
    n_val = max(1 if n >= 3 else 0, int(round(n * SPLIT_FRACTIONS[1])))
    n_test = max(1 if n >= 3 else 0, int(round(n * SPLIT_FRACTIONS[2])))
    return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def _make_item(family: str, index: int, split: str, seed: int, sampler: CropSampler) -> dict[str, Any]:
    """One detection sample (and, for real images, its caption): image, answer, prompt, metadata."""
    fam_id = ("real", *fakes.FAMILIES).index(family)
    rng = np.random.default_rng([seed, fam_id, index])
    cell = sampler.pick_cell(split, rng)
    src = SOURCES[cell.source]
    subject = src.subjects[int(rng.integers(len(src.subjects)))]
    item: dict[str, Any] = {"family": family, "split": split, "source": src.name}
    mask, info = None, {}
    if family == "real":
        img, zoom = sampler.crop(cell, rng)
        m = ms.measure(img)
        item["caption"] = ex.caption(subject, src.kind, zoom, m, cell.position, rng)
    elif family == "gan_upsample":
        res = fakes.gan_upsample(sampler.crop(cell, rng)[0], rng)
    elif family == "spectral":
        ref, _ = sampler.crop(cell, rng)
        res = fakes.spectral(ref.shape[:2], ref, rng)
    elif family == "diffusion_like":
        res = fakes.diffusion_like(sampler.crop(cell, rng)[0], rng)
    elif family == "splice":
        host, _ = sampler.crop(cell, rng)
        copy_move = bool(rng.random() < 0.4)
        donor_cell = cell if copy_move else sampler.pick_cell(split, rng)
        donor, _ = sampler.crop(donor_cell, rng, hw=host.shape[:2])
        if copy_move:
            subject_note = "copy-move"
        else:
            subject_note = SOURCES[donor_cell.source].name
        res = fakes.splice(host, donor, rng, copy_move=copy_move)
        item["donor"] = subject_note
    else:
        raise ValueError(family)
    if family != "real":
        img, info = res.image, res.info
        mask = info.pop("mask", None)
        m = ms.measure(img, mask=mask)
    item["image"] = img
    item["answer"] = ex.explain(family, m, rng, subject=subject, info=info)
    item["prompt"] = "<image>" + ex.PROMPTS[int(rng.integers(len(ex.PROMPTS)))]
    return item


def train_tokenizer(texts: list[str], path: Path) -> None:
    """Byte-level BPE on ``texts``: exactly ``VOCAB_SIZE - 4`` ordinary tokens, then the special tokens."""
    train_bpe(texts, path, VOCAB_SIZE)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("unigendet", "numpy", "scipy", "scikit-image", "pillow", "tokenizers"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


_README = """# UniGenDet embedded demo corpus

Built by `unigendet demo-data` (unigendet/demo/corpus.py), seed {seed}. Nothing here was downloaded.

- `detection/{{train,val,test}}.json`: FakeClue-format records (label 0 = fake, 1 = real; `cate` = family).
  Real images are crops of the photographs shipped in scikit-image (`skimage.data`); fakes come from four
  hand-written generators: `gan_upsample` (transposed-convolution checkerboards), `spectral` (random-phase 1/f
  synthesis), `diffusion_like` (iterative denoising from noise), `splice` (pasted regions). Each answer is written
  from measurements of its image (spectral peaks, noise, smoothness, seams, colours).
- `t2i/{{train,val,test}}.jsonl`: `{{"image_path", "prompt"}}` pairs: the real crops and their captions.
- `tokenizer.json`: byte-level BPE trained on this text; ids 2044..2047 are `<|im_start|>`, `<|im_end|>`,
  `<|vision_start|>`, `<|vision_end|>`.
- Held-out splits come from grid cells of the source photos that train never sees.

Counts: {counts}

See docs/demo_corpus.md in the repository for what each family's traces are.
"""


_SAMPLER: CropSampler | None = None  # one per process (the photos are loaded once)


def _init_worker(size_range: tuple[int, int]) -> None:
    global _SAMPLER
    photos = load_sources()
    _SAMPLER = CropSampler(photos, make_cells(photos), size_range)


def _run_job(job: tuple[str, int, str, int]) -> dict[str, Any]:
    """Make one item in this process and encode its PNG (so encoding runs in the workers too)."""
    family, index, split, seed = job
    assert _SAMPLER is not None
    item = _make_item(family, index, split, seed, _SAMPLER)
    img = item.pop("image")
    item.update(png=_png(img), height=img.shape[0], width=img.shape[1], index=index)
    return item


def build_demo_corpus(out: Path, seed: int = 0, n_real: int = FULL["n_real"],
                      n_fake_per_family: int = FULL["n_fake_per_family"],
                      size_range: tuple[int, int] = SIZE_RANGE, workers: int | None = None) -> dict[str, Any]:
    """Write the demo corpus under ``out`` and return a summary.

    Args:
        out: output folder (created; existing corpus files are overwritten).
        seed: everything is a deterministic function of it (not of ``workers``).
        n_real: number of real images (each also a T2I pair), split 80/10/10.
        n_fake_per_family: fakes per family, split 80/10/10.
        size_range: min and max side in pixels, multiples of 8.
        workers: processes making images; default 1 for small corpora, else min(2, CPU count).

    Returns:
        ``{"out", "seed", "counts": {split: {family: n}}, "t2i": {split: n}, "n_images", "bytes", "seconds",
        "workers", "paths": {...}}``.
    """
    t0 = time.perf_counter()
    if size_range[0] % SIDE_STEP or size_range[1] % SIDE_STEP or not 8 <= size_range[0] <= size_range[1]:
        raise ValueError(f"size_range must be multiples of {SIDE_STEP}, got {size_range}")
    out = Path(out)
    jobs = [(family, index, split, seed)
            for family, n in (("real", n_real), *((f, n_fake_per_family) for f in fakes.FAMILIES))
            for index, split in enumerate(_allocate(n))]
    if workers is None:
        workers = 1 if len(jobs) < 400 else max(1, min(2, os.cpu_count() or 1))
    det_dir, t2i_dir = out / "detection", out / "t2i"
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    t2i: dict[str, list[dict]] = {s: [] for s in SPLITS}
    counts = {s: {f: 0 for f in ("real", *fakes.FAMILIES)} for s in SPLITS}
    texts: list[str] = []
    n_bytes = 0
    with contextlib.ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                                           initializer=_init_worker, initargs=(size_range,)))
            results = pool.map(_run_job, jobs, chunksize=32)
        else:
            _init_worker(size_range)
            results = map(_run_job, jobs)
        for item in results:  # in job order whatever the number of workers
            family, split, index = item["family"], item["split"], item["index"]
            rel = f"images/{split}/{family}/{index:05d}.png"
            (det_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (det_dir / rel).write_bytes(item["png"])
            n_bytes += len(item["png"])
            records[split].append({
                "image": rel, "label": 1 if family == "real" else 0, "cate": family, "width": item["width"],
                "height": item["height"],
                "conversations": [{"from": "human", "value": item["prompt"]}, {"from": "gpt", "value": item["answer"]}],
            })
            counts[split][family] += 1
            texts += [item["prompt"].removeprefix("<image>"), item["answer"]]
            if family == "real":
                t_rel = f"images/{split}/{index:05d}.png"
                (t2i_dir / t_rel).parent.mkdir(parents=True, exist_ok=True)
                (t2i_dir / t_rel).write_bytes(item["png"])
                n_bytes += len(item["png"])
                t2i[split].append({"image_path": t_rel, "prompt": item["caption"]})
                texts.append(item["caption"])
    train_prompts = {r["prompt"] for r in t2i["train"]}
    leaked = [r["prompt"] for s in ("val", "test") for r in t2i[s] if r["prompt"] in train_prompts]
    assert not leaked, f"held-out captions also in train: {leaked[:3]}"
    paths = {}
    for split in SPLITS:
        order = np.random.default_rng([seed, 1000 + SPLITS.index(split)]).permutation(len(records[split]))
        p = det_dir / f"{split}.json"
        p.write_text(json.dumps([records[split][i] for i in order], indent=1) + "\n")
        q = t2i_dir / f"{split}.jsonl"
        q.write_text("".join(json.dumps(r) + "\n" for r in t2i[split]))
        paths[f"detection_{split}"], paths[f"t2i_{split}"] = str(p), str(q)
    tok_path = out / "tokenizer.json"
    train_tokenizer(texts, tok_path)
    n_images = sum(sum(c.values()) for c in counts.values())
    t2i_counts = {s: len(t2i[s]) for s in SPLITS}
    manifest = {
        "seed": seed, "n_real": n_real, "n_fake_per_family": n_fake_per_family, "size_range": list(size_range),
        "counts": counts, "t2i": t2i_counts, "n_detection_images": n_images, "image_bytes": n_bytes,
        "families": ["real", *fakes.FAMILIES], "sources": [s.name for s in SOURCES],
        "special_tokens": {t: VOCAB_SIZE - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS.values())},
        "versions": _versions(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    (out / "README.md").write_text(_README.format(seed=seed, counts=json.dumps(counts)))
    paths.update({"tokenizer": str(tok_path), "manifest": str(out / "manifest.json"), "root": str(out)})
    return {"out": str(out), "seed": seed, "counts": counts, "t2i": t2i_counts, "n_images": n_images,
            "bytes": n_bytes, "seconds": round(time.perf_counter() - t0, 2), "workers": workers, "paths": paths}


def main_demo_data(argv: list[str] | None = None) -> int:
    """``unigendet demo-data --out DIR [--seed S] [--small]``: build the corpus, print one JSON summary line."""
    parser = argparse.ArgumentParser(prog="unigendet demo-data", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed -> identical files)")
    parser.add_argument("--small", action="store_true",
                        help=f"a few-second variant ({SMALL['n_real']} real, {SMALL['n_fake_per_family']} per family)")
    args = parser.parse_args(argv)
    sizes = SMALL if args.small else FULL
    summary = build_demo_corpus(args.out, seed=args.seed, **sizes)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_demo_data())
