"""The evaluation protocol (FakeVLM / UniGenDet, docs/method.md, "Evaluation protocol") behind ``python -m unigendet
test``.

Features:
* **Detection** on a FakeClue-format test split: every image is asked its record's question; the real/fake head gives
  p(fake) and a label, the greedy explanation (KV cache) gives a second label parsed from its text
  (:func:`unigendet.evaluation.text_metrics.parse_label`). Both are scored with accuracy and macro-F1 (fake =
  positive; an
  unparsed text counts as wrong), the head also with AUROC; the explanation with ROUGE-L (F, stemmed) and CSS (TF-IDF
  cosine) against the reference answer; everything also per ``cate``. Unreadable images are skipped and counted by
  reason, never silently dropped.
* **Generation** on a text-to-image test split: one image per caption (fixed per-caption seeds), FID / KID / IS
  against the paired real images (centre crop + resize to 299, torch-fidelity with a local Inception file; without one
  the report says so and the rest runs), and the detector's p(fake) on the generated images.
* **Batch by batch, never every image**: records are decoded as they are consumed, ``batch_size`` at a time. For
  generation each batch's real images become Inception features, then the batch is generated, saved as PNGs
  (``generated/<record index>.png``, prompt and seed in the PNG text), turned into Inception features and judged by the
  detector, and dropped: a rank holds about one batch of images at any time, and only 2048 + 1008 floats per image
  are kept (:mod:`unigendet.evaluation.fidelity`). The metrics are those of torch-fidelity on the same images.
* **Data parallel**: each rank takes every world-th record; rows, p(fake), Inception features and skip counts are
  gathered (never images), rank 0 computes the fidelity metrics from the features sorted by record index (KID subsets
  and IS splits then match a single process) and writes the report, and every rank returns the same results. The
  generated PNGs are written by the rank that made them, into ``<out_dir>/generated`` (a shared file system across
  nodes), or into a temporary folder that :func:`unigendet.evaluation.report.write_report` empties into it when no
  output folder is known.
* **Report**: ``results.json`` (settings, metrics, skips), ``detections.jsonl`` (one row per image: p(fake), both
  labels, explanation, reference, ROUGE-L, CSS), ``report.md`` (the tables a paper would show), its figures
  ``roc.png``, ``confusion_matrix.png`` and ``per_category.png`` (:mod:`unigendet.evaluation.plots`; a figure that
  cannot be drawn
  is replaced by a line saying why) and, optionally, the generated PNGs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from unigendet.constants import INCEPTION_WEIGHTS_ENV
from unigendet.distributed.ranks import gather_per_rank, world
from unigendet.evaluation.scores import LABELS, summarize_detection
from unigendet.evaluation.text_metrics import RougeL, css, parse_label
from unigendet.inputs.skips import SkipCounter

log = logging.getLogger("unigendet.evaluation.protocol")


@dataclass
class EvalConfig:
    """What ``test`` evaluates beyond the head metrics of the test loop (``LitUniGenDet(evaluation=...)``)."""

    split: str = "test"
    detection: bool = True
    explain: bool = True  # False: head only (no explanations, no ROUGE-L / CSS / text labels)
    max_new_tokens: int = 256
    max_images: int | None = None  # the first N detection records (None: all)
    batch_size: int = 8
    generation: bool = True
    max_prompts: int | None = None  # the first N text-to-image records (None: all)
    gen_px: int = 256
    gen_steps: int | None = None  # None: the model's default (50 for BAGEL)
    cfg_scale: float | None = None
    seed: int = 0  # caption i gets seed + i
    inception_weights: str | None = None  # None: $UNIGENDET_INCEPTION_WEIGHTS; absent: no FID/KID/IS
    kid_subset_size: int | None = None
    save_images: bool = True
    progress: bool = True  # progress bars on stderr (rank zero)
    out_dir: str | None = None  # None: <log dir>/eval

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.gen_px < 1:
            raise ValueError("gen_px must be >= 1")


#####################################################################################################
# detection
#####################################################################################################


class Batches:
    """Consecutive items of an iterable in lists of at most ``size``, pulled lazily; a list also ends before an item
    for which ``same(first item, item)`` is False. Once a list is handed out nothing of it is kept here (only that
    one item read ahead), so its images go as soon as the caller drops the list."""

    def __init__(self, items: Iterable, size: int, same: Callable[[Any, Any], bool] | None = None) -> None:
        self.items, self.size, self.same = iter(items), size, same
        self.ahead: list = []

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> list:
        batch, self.ahead = self.ahead, []
        while len(batch) < self.size:
            item = next(self.items, _END)
            if item is _END:
                break
            if batch and self.same is not None and not self.same(batch[0], item):
                self.ahead = [item]
                break
            batch.append(item)
        if not batch:
            raise StopIteration
        return batch


_END = object()


def detect_rows(engine, items: Iterable[tuple[int, Any, Any]], cfg: EvalConfig, with_vae: bool) -> list[dict]:
    """One row per (index, record, image), the images consumed lazily; consecutive records asking the same question
    share a batch of at most ``cfg.batch_size``."""
    rouge = RougeL() if cfg.explain else None
    rows: list[dict] = []
    for chunk in Batches(items, cfg.batch_size, same=lambda a, b: a[1].prompt == b[1].prompt):
        dets = engine.detect([img for _, _, img in chunk], prompt=chunk[0][1].prompt, with_vae=with_vae,
                             explain=cfg.explain, max_new_tokens=cfg.max_new_tokens)
        for (index, rec, _), det in zip(chunk, dets, strict=True):
            row = {"index": index, "id": rec.id, "cate": rec.cate, "label": LABELS[rec.label],
                   "p_fake": det.p_fake, "head": det.label}
            if cfg.explain:
                text_label = parse_label(det.explanation)
                row.update(explanation=det.explanation, reference=rec.answer,
                           text=None if text_label is None else LABELS[text_label],
                           rouge_l=rouge(det.explanation, rec.answer), css=css(rec.answer, det.explanation))
            rows.append(row)
        del chunk  # the images, before the next batch is read
    return rows


#####################################################################################################
# generation
#####################################################################################################


def inception_or_reason(cfg: EvalConfig, device: str = "cpu"):
    """(torch-fidelity's Inception feature extractor, None), or (None, why) when there are no weights."""
    from unigendet.evaluation.fidelity import InceptionWeightsMissing, inception_extractor

    try:
        return inception_extractor(cfg.inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV), device), None
    except InceptionWeightsMissing as e:
        return None, str(e)


def fidelity_or_reason(real: dict | None, fake: dict | None, cfg: EvalConfig) -> dict[str, Any]:
    """FID / KID / IS from the Inception features (:func:`unigendet.evaluation.fidelity.inception_features`, rows
    paired and in
    record order) of the real and the generated images, or ``{"not_computed": why}``."""
    from unigendet.evaluation.fidelity import InceptionWeightsMissing, count, inception_weights, metrics_from_features

    try:
        inception_weights(cfg.inception_weights or os.environ.get(INCEPTION_WEIGHTS_ENV))
    except InceptionWeightsMissing as e:
        log.warning("FID/KID/IS not computed: %s", e)
        return {"not_computed": str(e)}
    n = min(count(real), count(fake))
    if n < 2:
        return {"not_computed": f"FID needs >= 2 image pairs, have {n}"}
    return metrics_from_features(fake, real, kid_subset_size=cfg.kid_subset_size)


def _save_pngs(images: list, index: list[int], prompts: list[str], seeds: list[int], folder: Path,
               settings: dict | None = None) -> None:
    """``folder/<index>.png`` for each image, its prompt, seed and sampler ``settings`` in the PNG's text chunks."""
    from PIL.PngImagePlugin import PngInfo

    for i, prompt, seed, img in zip(index, prompts, seeds, images, strict=True):
        meta = PngInfo()
        meta.add_text("prompt", prompt)
        meta.add_text("seed", str(seed))
        if settings is not None:
            meta.add_text("unigendet", json.dumps({**settings, "seed": seed}))
        img.save(folder / f"{i:05d}.png", pnginfo=meta)


def generate_batches(engine, items: Iterable[tuple[int, Any, Any]], cfg: EvalConfig, *, extractor=None,
                     png_dir: Path | None = None, detect: Callable[[list], Any] | None = None) -> dict[str, Any]:
    """This rank's generation, batch by batch over (index, record, real image): the real images' Inception features,
    then one image per caption (seed ``cfg.seed + index``), saved to ``png_dir/<index>.png``, its Inception features
    and ``detect(images) -> p(fake)``. Only the per-image results are kept, no image outlives its batch.

    Returns:
        ``{"index", "prompt", "p_fake": lists, "real", "fake": feature dicts (empty without an extractor)}``.
    """
    from unigendet.evaluation.fidelity import concat_features, inception_features

    out: dict[str, Any] = {"index": [], "prompt": [], "p_fake": [], "real": [], "fake": []}
    # the sampler settings actually used (the model's defaults filled in), for the PNGs
    settings = {"height": cfg.gen_px, "width": cfg.gen_px,
                **engine.cfg.flow.sampler_settings(cfg.gen_steps, cfg_scale=cfg.cfg_scale)}
    for chunk in Batches(items, cfg.batch_size):
        index, prompts = [i for i, _, _ in chunk], [rec.prompt for _, rec, _ in chunk]
        if extractor is not None:
            out["real"].append(inception_features(extractor, [img for _, _, img in chunk]))
        del chunk  # the real images
        seeds = [cfg.seed + i for i in index]
        images = engine.generate(prompts, height=cfg.gen_px, width=cfg.gen_px, steps=cfg.gen_steps,
                                 cfg_scale=cfg.cfg_scale, seed=seeds)
        if png_dir is not None:
            _save_pngs(images, index, prompts, seeds, png_dir, settings)
        if extractor is not None:
            out["fake"].append(inception_features(extractor, images))
        if detect is not None:
            out["p_fake"] += [float(p) for p in detect(images)]
        del images
        out["index"] += index
        out["prompt"] += prompts
    out["real"], out["fake"] = concat_features(out["real"]), concat_features(out["fake"])
    return out


#####################################################################################################
# the whole protocol over a data module
#####################################################################################################


def _t2i_side(dm):
    return dm.text_to_image


def _first(records, limit: int | None):
    return list(records if limit is None else records[:limit])


def _images(dm, split: str, records: list, skips: SkipCounter, progress: str | None = None
            ) -> Iterator[tuple[int, Any, Any]]:
    """(index, record, image) for this rank's records (every world-th), each image decoded only when it is asked
    for; unreadable ones are counted in skips. ``progress``: a bar with this title on rank zero's stderr."""
    rank, size = world()
    indexes = range(rank, len(records), size)
    if progress and rank == 0:
        from tqdm import tqdm

        indexes = tqdm(indexes, desc=progress, unit="image", file=sys.stderr, dynamic_ncols=True)
    for index in indexes:
        img = dm.record_image(split, records[index], skips)
        if img is not None:
            yield index, records[index], img


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """The skip counts of every rank, added up by reason."""
    total = SkipCounter()
    for c in counts:
        total.counts.update(c)
    return dict(total.counts)


def report_dir(cfg: EvalConfig, trainer) -> Path:
    """Where ``unigendet test`` reports: ``cfg.out_dir``, else ``<the run's folder>/eval``, next to the run's
    ``config.yaml`` and checkpoints (:func:`unigendet.tracking.runs.shared_run_folder`: a broadcast, every rank calls
    it)."""
    from unigendet.tracking.runs import shared_run_folder

    return Path(cfg.out_dir) if cfg.out_dir else shared_run_folder(trainer) / "eval"


def _png_dir(dm, cfg: EvalConfig, out_dir) -> Path | None:
    """Where this rank saves the generated PNGs: ``<out_dir>/generated``; without it, under the folder the report goes
    to (:func:`report_dir`, of the datamodule's trainer), else a temporary folder
    :func:`unigendet.evaluation.report.write_report` empties."""
    if not cfg.save_images:
        return None
    trainer = getattr(dm, "trainer", None)
    root = out_dir or (report_dir(cfg, trainer) if trainer is not None else cfg.out_dir)
    if root is None:
        return Path(tempfile.mkdtemp(prefix="unigendet-generated-"))
    folder = Path(root) / "generated"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _by_index(parts: list[dict[str, Any]]) -> tuple[list[int], list[str], list[float], dict, dict]:
    """Every rank's generation results merged in record order: index, prompt, p(fake), real and fake features."""

    from unigendet.evaluation.fidelity import concat_features, count

    index = [i for p in parts for i in p["index"]]
    order = sorted(range(len(index)), key=index.__getitem__)
    prompts = [q for p in parts for q in p["prompt"]]
    p_fake = [q for p in parts for q in p["p_fake"]]
    real, fake = (concat_features(p[side] for p in parts) for side in ("real", "fake"))
    perm = torch.tensor(order, dtype=torch.long)

    def pick(features: dict) -> dict:  # features of every image (else some rank had no weights: left as they are)
        return {k: v[perm] for k, v in features.items()} if count(features) == len(order) else features

    return ([index[k] for k in order], [prompts[k] for k in order], [p_fake[k] for k in order] if p_fake else [],
            pick(real), pick(fake))


def run_protocol(engine, dm, cfg: EvalConfig, *, detect_images=None,
                 out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate the engine's model on ``dm``'s ``cfg.split``. ``detect_images(images) -> p_fake`` (head only, as
    the detection data presents images) scores the generated images; None: the engine's own detect. ``out_dir``: the
    report's folder, where the generated PNGs go (default: ``cfg.out_dir``, see :func:`_png_dir`)."""
    results: dict[str, Any] = {"settings": asdict(cfg)}
    rank, size = world()
    t0 = time.perf_counter()
    rows: list[dict] = []
    side = dm.detection
    if cfg.detection and side is not None and getattr(side, cfg.split, None) is not None:
        engine.vit_tf, engine.vae_tf = dm.vit_tf(), dm.vae_tf()  # as the test batches see the images
        records = _first(dm.split_records(cfg.split), cfg.max_images)
        skips = SkipCounter()
        title = "test: detect + explain" if cfg.explain else "test: detect"
        mine = detect_rows(engine, _images(dm, cfg.split, records, skips, cfg.progress and title), cfg, side.with_vae)
        gathered = gather_per_rank((mine, dict(skips.counts)))
        rows = sorted((r for part, _ in gathered for r in part), key=lambda r: r["index"])
        results["detection"] = {**summarize_detection(rows), "records": len(records),
                                "skipped": _summed(c for _, c in gathered), "with_vae": side.with_vae}
    elif cfg.detection:
        results["detection"] = {"not_run": f"no detection {cfg.split} split in {type(dm).__name__}"}
    t2i = _t2i_side(dm)
    png_dirs: list[str] = []
    if cfg.generation and t2i is not None and getattr(t2i, cfg.split, None) is not None:
        records = _first(t2i.split_records(cfg.split), cfg.max_prompts)
        skips = SkipCounter()
        png_dir = _png_dir(dm, cfg, out_dir)
        extractor, missing = inception_or_reason(cfg)
        detect = None
        if side is not None:
            detect = detect_images or (lambda images: [d.p_fake for d in engine.detect(images, explain=False,
                                                                                          with_vae=side.with_vae)])
        mine = generate_batches(engine, _images(t2i, cfg.split, records, skips, cfg.progress and "test: generate"),
                                cfg, extractor=extractor,
                                png_dir=png_dir, detect=detect)
        del extractor
        gathered = gather_per_rank((mine, dict(skips.counts), missing, None if png_dir is None else str(png_dir)))
        index, prompts, p_fake, real, fake = _by_index([m for m, *_ in gathered])
        png_dirs = sorted({d for *_, d in gathered if d is not None})
        gen: dict[str, Any] = {"n": len(index), "records": len(records),
                               "skipped": _summed(c for _, c, _, _ in gathered), "px": cfg.gen_px}
        if p_fake:
            gen["p_fake_mean"] = sum(p_fake) / len(p_fake)
            gen["judged_fake"] = sum(p >= 0.5 for p in p_fake) / len(p_fake)
        fidelity = None
        if rank == 0:
            lacking = [(r, why) for r, (_, _, why, _) in enumerate(gathered) if why is not None]
            if lacking and missing is None:  # weights on rank 0 but not on another rank: features of part only
                fidelity = {"not_computed": f"rank {lacking[0][0]}: {lacking[0][1]}"}
            else:
                fidelity = fidelity_or_reason(real, fake, cfg)
        del gathered, real, fake
        gen["fidelity"] = gather_per_rank(fidelity)[0]
        gen["prompts"] = prompts
        gen["seeds"] = [cfg.seed + i for i in index]
        gen["files"] = [f"{i:05d}.png" for i in index] if png_dirs else []
        results["generation"] = gen
    elif cfg.generation:
        results["generation"] = {"not_run": f"no text-to-image {cfg.split} split in {type(dm).__name__}"}
    results["seconds"] = time.perf_counter() - t0
    results["world_size"] = size
    results["_rows"], results["_png_dirs"] = rows, png_dirs
    return results


#####################################################################################################
# report
#####################################################################################################


