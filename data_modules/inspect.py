"""``unigendet inspect-data``: stream a corpus through the training readers and transforms before a long run.

Features:

* **Every corpus format training reads**: FakeClue JSON / JSONL, T2I metadata files, Parquet files and folders, Hugging
  Face datasets saved to disk (``save_to_disk`` folders) and WebDataset / img2dataset tar shards (brace patterns,
  folders); damaged shards count ``truncated_tar`` / ``corrupt_tar``.
* **The same code path as training**: :func:`~unigendet.inputs.records.read_detection` / ``read_t2i``, the table and
  tar readers of :mod:`unigendet.inputs.rows`,
  :func:`~unigendet.inputs.images.open_image` and the ViT + VAE transforms of the chosen preset (detection records go
  through both, T2I records through the VAE one), so every record that would be skipped in training is skipped and
  counted here, per reason, with one example id each.
* **One JSON object on stdout**: ``{"delivered": N, "skipped": {reason: count}, "examples": {reason: id}}``.
  Exit code 0 even when records were skipped; 2 when a corpus cannot be read at all (missing file, not
  JSON / JSON Lines / Parquet, missing Parquet columns), with the message on stderr.
* **Progress on stderr** (tqdm, records/s and the running skip count), streaming and memory-light: a 100k-image crawl
  is read record by record, one decoded image at a time.

Wiring into an argparse CLI: ``add_inspect_arguments(subparser)`` + ``subparser.set_defaults(func=cmd_inspect)``;
or call :func:`main_inspect` with the arguments after ``inspect-data``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unigendet.inputs.images import MAX_PIXELS, open_image
from unigendet.inputs.records import CorpusError, t2i_image_root
from unigendet.inputs.rows import Columns, TarRecords, image_source, read_corpus
from unigendet.inputs.skips import SkipCounter
from unigendet.inputs.tar_shards import expand_shards, is_tar_spec, iter_samples

DEFAULT_PRESET = "bagel-7b-mot"


def _progress(records: Iterator, enabled: bool, desc: str, skips: SkipCounter) -> Iterator:
    """Wrap ``records`` in a tqdm bar on stderr (records/s, running skip count)."""
    if not enabled:
        yield from records
        return
    from tqdm import tqdm

    with tqdm(desc=desc, unit="rec", file=sys.stderr, mininterval=0.5, dynamic_ncols=True) as bar:
        for i, rec in enumerate(records):
            yield rec
            bar.update(1)
            if i % 64 == 0:
                bar.set_postfix(skipped=skips.total, refresh=False)
        bar.set_postfix(skipped=skips.total)


def _limited(records: Iterator, limit: int | None) -> Iterator:
    for i, rec in enumerate(records):
        if limit is not None and i >= limit:
            return
        yield rec


def _check_chunk(kind: str, records: list, root: Path | None, cfg: Any, max_pixels: int,
                 image_column: str) -> tuple[int, dict]:
    """Decode and transform one chunk of records (in a worker process, or inline): (delivered, skip state)."""
    from unigendet.inputs.transforms import vae_transform, vit_transform

    skips = SkipCounter()
    vit_tf, vae_tf = vit_transform(cfg), vae_transform(cfg)
    delivered = 0
    for rec in records:
        try:
            source, where = image_source(rec, image_column, root)
        except (IndexError, KeyError, OSError) as e:  # a damaged table: that record is skipped, counted
            skips.skip("unreadable_image", rec.id, f"cannot read the image cell: {e}")
            continue
        img = open_image(source, skips, rec.id, root=where, max_pixels=max_pixels)
        ok = img is not None and (kind != "detection" or vit_tf.apply(img, skips, rec.id) is not None) \
            and vae_tf.apply(img, skips, rec.id) is not None
        delivered += ok
    return delivered, skips.state_dict()


def _quiet_worker() -> None:
    import logging

    logging.getLogger("unigendet.data").setLevel(logging.ERROR)  # the main process logs each new reason once


def _chunks(records: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for rec in records:
        chunk.append(rec)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tar_records(spec: str | os.PathLike, skips: SkipCounter, to_record: TarRecords) -> Iterator:
    """Every record of the tar shards ``spec`` names, shard after shard (bad samples counted in ``skips``)."""
    for shard in expand_shards(spec, skips):
        for sample in iter_samples(shard, skips):
            rec = to_record(sample, skips)
            if rec is not None:
                yield rec


def corpus_records(kind: str, path: str | os.PathLike, skips: SkipCounter, cols: Columns) -> Iterator:
    """The records of a detection or T2I corpus in any format training reads."""
    if is_tar_spec(path):
        return tar_records(path, skips, TarRecords(kind, cols))
    return read_corpus(kind, path, skips, cols)


def inspect_data(detection: str | os.PathLike | None = None, t2i: str | os.PathLike | None = None,
                 image_root: str | os.PathLike | None = None, cfg: Any = None, limit: int | None = None,
                 progress: bool = True, *, image_column: str = "image", caption_column: str = "caption",
                 label_column: str = "label", conversation_column: str | None = "conversations",
                 max_pixels: int = MAX_PIXELS, workers: int = 0, chunk_size: int = 64) -> dict:
    """Stream the corpora through readers, image decoding and transforms; count what would be delivered or skipped.

    Args:
        detection: a FakeClue JSON / JSONL file, a saved HF dataset folder, Parquet file(s) or tar shards.
        t2i: a T2I metadata file, Parquet file or folder of Parquet shards, a saved HF dataset folder or tar shards
            (``laion/{00000..00099}.tar``, a folder of ``*.tar``).
        image_root: the detection images' root (default: the detection file's folder). T2I metadata paths are
            relative to the metadata file's folder.
        cfg: a ``UniGenDetConfig`` or a preset name (default ``bagel-7b-mot``); gives the transforms' strides/bounds.
        limit: read at most this many records (delivered or skipped) of each corpus.
        progress: show a progress bar on stderr.
        image_column: table image column (raw bytes or a ``{"bytes": ...}`` struct); tar shards: the image member's
            extension (default: the first image member).
        caption_column: table caption column; tar shards: the ``.txt`` member, else this ``.json`` key.
        label_column: detection tables and tar ``.json``: the label field.
        conversation_column: detection tables and tar ``.json``: the FakeClue conversation field (None or absent:
            verdict-only answers).
        max_pixels: decompression-bomb limit for one image.
        workers: decode in this many processes (0: in this process). Results do not depend on it.
        chunk_size: records per task sent to a worker.

    Returns:
        ``{"delivered": N, "skipped": {reason: count}, "examples": {reason: record id}}`` (records skipped by the
        readers are included; a delivered record passed decoding and every transform).

    Raises:
        FileNotFoundError, CorpusError: a corpus cannot be read at all.
    """
    from concurrent.futures import ProcessPoolExecutor

    from unigendet.model.config import UniGenDetConfig

    if detection is None and t2i is None:
        raise ValueError("nothing to inspect: give a detection and/or a t2i corpus")
    if cfg is None or isinstance(cfg, str):
        cfg = UniGenDetConfig.from_name(cfg or DEFAULT_PRESET)
    skips = SkipCounter()
    delivered = 0
    jobs = []
    cols = Columns(image=image_column, caption=caption_column, label=label_column,
                   conversations=conversation_column)
    if detection is not None:
        root = Path(image_root) if image_root is not None else Path(detection).parent
        jobs.append(("detection", _limited(corpus_records("detection", detection, skips, cols), limit), root))
    if t2i is not None:
        root = Path(t2i) if Path(t2i).is_dir() else t2i_image_root(t2i)
        jobs.append(("t2i", _limited(corpus_records("t2i", t2i, skips, cols), limit), root))

    pool = ProcessPoolExecutor(workers, initializer=_quiet_worker) if workers > 0 else None
    try:
        for kind, records, root in jobs:
            chunks = _chunks(_progress(records, progress, kind, skips), chunk_size)
            args = (root, cfg, max_pixels, image_column)
            if pool is None:
                results = (_check_chunk(kind, c, *args) for c in chunks)
            else:  # in order, a bounded number of chunks in flight
                results = _ordered(pool, kind, chunks, args, depth=4 * workers)
            for n, state in results:
                delivered += n
                part = SkipCounter()
                part.load_state_dict(state)
                skips.merge(part, log_new=pool is not None)  # workers are quiet; new reasons are logged here
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return {"delivered": delivered, "skipped": dict(sorted(skips.counts.items())),
            "examples": dict(sorted(skips.examples.items()))}


def _ordered(pool, kind: str, chunks: Iterator[list], args: tuple, depth: int):
    from collections import deque

    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.submit(_check_chunk, kind, chunk, *args))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


#####################################################################################################
# Command line
#####################################################################################################


def add_inspect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``inspect-data`` options to ``parser`` (a subcommand parser or a standalone one)."""
    parser.add_argument("--detection", help="FakeClue-style JSON list or JSON Lines file, a saved Hugging Face dataset "
                                            "folder, Parquet file(s), or tar shards (a brace pattern or a folder)")
    parser.add_argument("--image-root", help="root of the detection images (default: the detection file's folder)")
    parser.add_argument("--t2i", help="T2I metadata JSON/JSONL, a Parquet file or folder of Parquet shards, a saved "
                                      "Hugging Face dataset folder, or img2dataset tar shards "
                                      "('laion/{00000..00099}.tar')")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help=f"model preset whose ViT/VAE transforms are applied (default {DEFAULT_PRESET})")
    parser.add_argument("--limit", type=int, default=None, help="read at most N records of each corpus")
    parser.add_argument("--image-column", default="image",
                        help="image column of a table; in tar shards the image member's extension (default: image, "
                             "i.e. the first image member)")
    parser.add_argument("--caption-column", default="caption",
                        help="caption column of a table; in tar shards the .json key used when there is no .txt")
    parser.add_argument("--label-column", default="label", help="detection label column / .json key")
    parser.add_argument("--conversation-column", default="conversations",
                        help="detection FakeClue conversation column / .json key ('none': verdict-only answers)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    cpus = os.cpu_count() or 1
    parser.add_argument("--workers", type=int, default=min(8, cpus) if cpus > 2 else 0,
                        help="processes decoding images (default: min(8, CPUs) on machines with more than 2 CPUs, "
                             "else 0 = in this process)")
    return parser


def cmd_inspect(args: argparse.Namespace) -> int:
    """Run ``inspect-data`` for parsed arguments: print the JSON report, return 0; or 2 if a corpus is unreadable."""
    if args.detection is None and args.t2i is None:
        print("unigendet inspect-data: error: give --detection and/or --t2i", file=sys.stderr)
        return 2
    try:
        report = inspect_data(detection=args.detection, t2i=args.t2i, image_root=args.image_root, cfg=args.preset,
                              limit=args.limit, progress=not args.no_progress, image_column=args.image_column,
                              caption_column=args.caption_column, label_column=args.label_column,
                              conversation_column=None if args.conversation_column.lower() == "none"
                              else args.conversation_column, workers=args.workers)
    except (CorpusError, OSError, ValueError) as e:
        print(f"unigendet inspect-data: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report))
    return 0


def main_inspect(argv: list[str] | None = None) -> int:
    """``unigendet inspect-data ARGV``: ``argv`` holds the arguments after the command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="unigendet inspect-data",
                                     description="Stream a corpus through the training readers and transforms and "
                                                 "print one JSON report of delivered and skipped records.")
    return cmd_inspect(add_inspect_arguments(parser).parse_args(argv))
