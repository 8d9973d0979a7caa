"""Benchmark: the data path - samples/s and packed tokens/s through the real DataModules and their train loaders.

Per corpus, preset, side (detection / t2i) and DataLoader worker count, ``dm.train_dataloader()`` is iterated: the
first packed batch (which includes the workers' start-up) is timed on its own (``first_batch_s``), then ``--batches``
more (or until ``--max-seconds``). Samples are ``len(batch.sample_lens)`` (summed over the parts of a dict batch),
tokens ``batch.seq_len``; rates divide the totals by the wall time of the measured batches, ``batch_ms_median`` is
the median wait per batch. DataLoader workers run with one torch thread each (the loader sets it); the main process
(which does the work when workers=0) with ``--main-threads`` (1).

Corpora (written to a temp dir, or to ``--data-dir`` and reused from there):

* ``demo``: the embedded demo corpus (:func:`unigendet.demo.corpus.build_demo_corpus`; ``--demo-size``, small by
  default: the full one takes 1-2 min to build on 2 cores and has the same 64-128 px images);
* ``jpeg512``: ``--jpeg-images`` 512x512 JPEGs (quality 90; smooth gradients, blobs and noise), a FakeClue detection
  JSON (labels, prompts, answers) and a T2I jsonl (captions), read at the ``demo`` and the ``bagel-7b-mot`` preset's
  ViT/VAE transforms (config only, no model). Its tokenizer is a small BPE trained on its text; the preset's special
  token ids are overridden to match it (only the image sizes of the preset matter here).

``--formats`` reads the jpeg512 corpus as ``files`` (JSON + image files, the default), ``parquet`` (8 Parquet files,
image bytes in a column: ``image`` + ``label`` + ``conversations`` / ``caption``) and ``tar`` (8 WebDataset shards:
``key.jpg`` + ``key.json`` / ``key.txt``, streamed 4 shards at a time per worker): the same images and text.

One JSON line per configuration.

    python bench/data_pipeline.py                                   # demo + jpeg512, workers 0 1 2 (about 2 min)
    python bench/data_pipeline.py --corpora jpeg512 --presets bagel-7b-mot --workers 0 4 8 16 --batches 40
    python bench/data_pipeline.py --corpora jpeg512 --presets bagel-7b-mot --formats tar parquet --batches 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_modules.detection import DetectionDataModule  # noqa: E402
from data_modules.t2i import T2IDataModule  # noqa: E402
from unigendet.demo.corpus import FULL, SMALL, build_demo_corpus  # noqa: E402
from unigendet.inputs.tokenizer import Tokenizer, train_bpe  # noqa: E402
from unigendet.model.config import UniGenDetConfig  # noqa: E402

BUDGETS = {"demo": 4096, "bagel-7b-mot": 16384}  # default tokens per packed batch (bagel: ~6 detection samples)
PRESETS = {"demo": ["demo"], "jpeg512": ["demo", "bagel-7b-mot"]}  # presets read per corpus by default
JPEG_VOCAB = 2048  # the jpeg512 corpus's BPE: special tokens at 2044..2047, like the demo preset
SUBJECTS = ("a quiet lake at dawn", "a red barn in a field", "a city street at night", "a bowl of fruit on a table",
            "a snowy mountain ridge", "a dog running on a beach", "an old stone bridge", "a field of sunflowers")
QUESTION = "<image>Does the image look real or fake?"


#####################################################################################################
# The 512 px JPEG corpus
#####################################################################################################


def natural_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image with photo-like statistics: a smooth colour gradient, low-frequency blobs and
    sensor-like noise (JPEG then has real work to do, unlike a flat or a white-noise image)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy  # (H, W)
    base = rng.uniform(40, 200, 3) + rng.uniform(-60, 60, 3) * ramp[..., None]  # (H, W, 3)
    coarse = rng.uniform(-50, 50, (8, 8, 3)).astype(np.float32)
    blobs = np.stack([np.asarray(Image.fromarray(coarse[..., c]).resize((size, size), Image.Resampling.BICUBIC))
                      for c in range(3)], axis=-1)
    noise = rng.normal(0, 6, (size, size, 3))
    return np.clip(base + blobs + noise, 0, 255).astype(np.uint8)


def write_jpeg_corpus(out: Path, n_images: int = 256, size: int = 512, seed: int = 0, quality: int = 90) -> dict:
    """Write ``n_images`` JPEGs, ``detection.json`` (FakeClue), ``t2i.jsonl`` and ``tokenizer.json`` under ``out``;
    returns their paths. Deterministic in ``seed``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    det, t2i, texts = [], [], []
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        rel = f"images/{i:05d}.jpg"
        Image.fromarray(natural_image(rng, size)).save(out / rel, quality=quality)
        label = i % 2  # 0 fake / 1 real
        subject = SUBJECTS[i % len(SUBJECTS)]
        answer = (f"This is a real image. The photo of {subject} shows consistent lighting and natural sensor noise."
                  if label else f"This is a fake image. The picture of {subject} has overly smooth gradients and "
                  "noise that does not follow the scene.")
        det.append({"image": rel, "label": label, "cate": "real" if label else "synthetic", "width": size,
                    "height": size, "conversations": [{"from": "human", "value": QUESTION},
                                                      {"from": "gpt", "value": answer}]})
        caption = f"a photo of {subject}, image {i}"
        t2i.append({"image_path": rel, "prompt": caption})
        texts += [QUESTION.removeprefix("<image>"), answer, caption]
    (out / "detection.json").write_text(json.dumps(det, indent=1) + "\n")
    (out / "t2i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in t2i))
    train_bpe(texts, out / "tokenizer.json", JPEG_VOCAB, min_frequency=1)
    return {"detection": str(out / "detection.json"), "t2i": str(out / "t2i.jsonl"),
            "tokenizer": str(out / "tokenizer.json")}


N_SHARDS = 8


def write_formats(out: Path, paths: dict) -> dict:
    """The jpeg512 corpus again as Parquet files and as WebDataset tar shards (``N_SHARDS`` of each per side, the
    same images and text); returns ``{"detection:parquet": ..., "t2i:tar": ..., ...}``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unigendet.inputs.tar_shards import write_shard

    det = json.loads(Path(paths["detection"]).read_text())
    t2i = [json.loads(line) for line in Path(paths["t2i"]).read_text().splitlines()]
    data = {rec["image"]: (out / rec["image"]).read_bytes() for rec in det}
    formats = {}
    for side, recs in (("detection", det), ("t2i", t2i)):
        pq_dir, tar_dir = out / f"{side}_parquet", out / f"{side}_tars"
        pq_dir.mkdir(exist_ok=True)
        tar_dir.mkdir(exist_ok=True)
        for k in range(N_SHARDS):
            part = recs[k::N_SHARDS]
            images = [data[r["image"] if side == "detection" else r["image_path"]] for r in part]
            if side == "detection":
                fields = ("label", "cate", "conversations")
                table = pa.table({"image": images, **{f: [r[f] for r in part] for f in fields}})
                members = [{"jpg": img, "json": json.dumps({f: r[f] for f in fields})}
                           for img, r in zip(images, part, strict=True)]
            else:
                table = pa.table({"image": images, "caption": [r["prompt"] for r in part]})
                members = [{"jpg": img, "txt": r["prompt"]} for img, r in zip(images, part, strict=True)]
            pq.write_table(table, pq_dir / f"{k:05d}.parquet", row_group_size=64)
            write_shard(tar_dir / f"{k:05d}.tar",  # keys: the records' indices
                        [(f"{k + i * N_SHARDS:09d}", fields) for i, fields in enumerate(members)])
        formats[f"{side}:parquet"], formats[f"{side}:tar"] = str(pq_dir), f"{tar_dir}/{{00000..{N_SHARDS - 1:05d}}}.tar"
    return formats


def demo_paths(out: Path, size: str, seed: int = 0) -> dict:
    if not (out / "tokenizer.json").exists():
        sizes = {"full": FULL, "small": SMALL}[size]
        build_demo_corpus(out, seed=seed, n_real=sizes["n_real"], n_fake_per_family=sizes["n_fake_per_family"])
    return {"detection": str(out / "detection/train.json"), "t2i": str(out / "t2i/train.jsonl"),
            "tokenizer": str(out / "tokenizer.json")}


#####################################################################################################
# Measuring a loader
#####################################################################################################


def batch_counts(batch) -> tuple[int, int]:
    """(samples, tokens) of a packed batch or a ``{name: packed batch}`` dict (summed over the parts)."""
    parts = batch.values() if isinstance(batch, dict) else [batch]
    return sum(len(b.sample_lens) for b in parts), sum(b.seq_len for b in parts)


def measure(loader, n_batches: int, max_seconds: float | None = None) -> dict:
    """Time the first batch of ``loader`` (worker start-up included) alone, then ``n_batches`` more (fewer if
    ``max_seconds`` runs out or the loader ends). Counts and skips are of the measured batches only (except
    ``skipped``: the workers' running skip counts, summed over the (stream, shard)s seen, first batch included)."""
    shard_skips: dict[tuple, dict] = {}

    def note_skips(batch) -> None:
        for name, b in (batch.items() if isinstance(batch, dict) else [("", batch)]):
            if "shard" in b.stats:
                shard_skips[(name, b.stats["shard"])] = dict(b.stats.get("skipped", {}))

    t0 = time.perf_counter()
    it = iter(loader)
    first = next(it)
    first_s = time.perf_counter() - t0
    note_skips(first)
    first_samples, first_tokens = batch_counts(first)
    samples = tokens = 0
    waits = []
    start = time.perf_counter()
    while len(waits) < n_batches:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t)
        s, n = batch_counts(batch)
        samples, tokens = samples + s, tokens + n
        note_skips(batch)
        if max_seconds is not None and time.perf_counter() - start >= max_seconds:
            break
    elapsed = time.perf_counter() - start
    del it  # shuts the workers down
    skipped: dict[str, int] = {}
    for counts in shard_skips.values():
        for reason, k in counts.items():
            skipped[reason] = skipped.get(reason, 0) + k
    return {"batches": len(waits), "samples": samples, "tokens": tokens, "elapsed_s": elapsed,
            "first_batch_s": first_s, "first_samples": first_samples, "first_tokens": first_tokens,
            "batch_ms_median": statistics.median(waits) * 1e3 if waits else None, "skipped": skipped}


#####################################################################################################
# DataModules
#####################################################################################################


def preset_config(preset: str, tokenizer: str) -> UniGenDetConfig:
    """The preset's config with the corpus tokenizer's special ids (only its image transforms matter here)."""
    cfg = UniGenDetConfig.from_name(preset)
    special = Tokenizer(tokenizer).special
    if cfg.tokens != special:
        cfg = UniGenDetConfig.from_name(preset, tokens=dataclasses.asdict(special))
    return cfg


def make_datamodule(side: str, paths: dict, cfg: UniGenDetConfig, workers: int, budget: int, packs: int,
                    seed: int = 0, fmt: str = "files"):
    cls = {"detection": DetectionDataModule, "t2i": T2IDataModule}[side]
    dm = cls(train=paths[side if fmt == "files" else f"{side}:{fmt}"], tokenizer=paths["tokenizer"],
             token_budget=budget, num_workers=workers, packs_per_epoch=packs, seed=seed)
    return dm.connect(cfg)


def run_config(corpus: str, paths: dict, preset: str, side: str, workers: int, args, fmt: str = "files") -> dict:
    budget = args.token_budget or BUDGETS.get(preset, 4096)
    cfg = preset_config(preset, paths["tokenizer"])
    dm = make_datamodule(side, paths, cfg, workers, budget, packs=args.batches + 1, seed=args.seed, fmt=fmt)
    m = measure(dm.train_dataloader(), args.batches, args.max_seconds)
    skipped = dict(dm.read_skips.counts)
    for reason, k in m["skipped"].items():
        skipped[reason] = skipped.get(reason, 0) + k
    el = m["elapsed_s"]
    row = {"bench": "data_pipeline", "corpus": corpus, "format": fmt, "preset": preset, "side": side,
           "workers": workers,
           "token_budget": budget, "batches": m["batches"], "samples": m["samples"], "tokens": m["tokens"],
           "elapsed_s": round(el, 6), "samples_per_s": round(m["samples"] / el, 2),
           "tokens_per_s": round(m["tokens"] / el), "tokens_per_batch": round(m["tokens"] / max(1, m["batches"])),
           "batch_ms_median": round(m["batch_ms_median"], 1) if m["batch_ms_median"] is not None else None}
    if workers > 0:
        row["samples_per_s_per_worker"] = round(m["samples"] / el / workers, 2)
    row.update({"first_batch_s": round(m["first_batch_s"], 3), "skipped": skipped, "cpus": os.cpu_count(),
                "main_threads": torch.get_num_threads(), "worker_threads": 1})
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpora", nargs="+", choices=sorted(PRESETS), default=["demo", "jpeg512"])
    ap.add_argument("--presets", nargs="+", default=None,
                    help="presets to read each corpus at (default: demo for demo; demo and bagel-7b-mot for jpeg512)")
    ap.add_argument("--sides", nargs="+", choices=["detection", "t2i"], default=["detection", "t2i"])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batches", type=int, default=8, help="measured packed batches per configuration")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop measuring a configuration after this")
    ap.add_argument("--token-budget", type=int, default=None, help=f"tokens per packed batch (default: {BUDGETS})")
    ap.add_argument("--demo-size", choices=["full", "small"], default="small",  # full takes ~1-2 min to build
                    help=f"demo corpus size: small {SMALL} or full {FULL} (same image sizes, so the same rates)")
    ap.add_argument("--jpeg-images", type=int, default=256)
    ap.add_argument("--formats", nargs="+", choices=["files", "parquet", "tar"], default=["files"],
                    help="how the jpeg512 corpus is stored (the demo corpus is always files)")
    ap.add_argument("--data-dir", type=Path, default=None, help="build (or reuse) the corpora here, not in a temp dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--main-threads", type=int, default=1,
                    help="torch threads of the main process (workers=0 decodes there; 2 threads on a busy 2-core box "
                         "measured 6x slower than 1)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.main_threads)
    warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata's own deprecation, once per loader
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp)
        for corpus in args.corpora:
            t0 = time.perf_counter()
            if corpus == "demo":
                paths = demo_paths(root / f"demo_{args.demo_size}", args.demo_size, args.seed)
            else:
                out = root / f"jpeg512_{args.jpeg_images}"
                paths = (write_jpeg_corpus(out, args.jpeg_images, seed=args.seed)
                         if not (out / "tokenizer.json").exists() else
                         {"detection": str(out / "detection.json"), "t2i": str(out / "t2i.jsonl"),
                          "tokenizer": str(out / "tokenizer.json")})
                formats = args.formats
                if set(formats) - {"files"}:
                    paths = {**paths, **write_formats(out, paths)}
            if corpus == "demo":
                formats = ["files"]
            print(f"{corpus}: corpus ready in {time.perf_counter() - t0:.1f} s ({root})", file=sys.stderr, flush=True)
            for preset in args.presets or PRESETS[corpus]:
                for side in args.sides:
                    for fmt in formats:
                        for workers in args.workers:
                            row = run_config(corpus, paths, preset, side, workers, args, fmt)
                            print(json.dumps(row), flush=True)
                            rows.append(row)
    torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    main()
