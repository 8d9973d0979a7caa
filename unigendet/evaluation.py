"""The evaluation protocol (FakeVLM / UniGenDet, METHOD.md §6) behind ``python -m unigendet test``.

Features:
* **Detection** on a FakeClue-format test split: every image is asked its record's question; the real/fake head gives
  p(fake) and a label, the greedy explanation (KV cache) gives a second label parsed from its text
  (:func:`unigendet.text_metrics.parse_label`). Both are scored with accuracy and macro-F1 (fake = positive; an
  unparsed text counts as wrong), the head also with AUROC; the explanation with ROUGE-L (F, stemmed) and CSS (TF-IDF
  cosine) against the reference answer; everything also per ``cate``. Unreadable images are skipped and counted by
  reason, never silently dropped.
* **Generation** on a text-to-image test split: one image per caption (fixed per-caption seeds), FID / KID / IS
  against the paired real images (centre crop + resize to 299, torch-fidelity with a local Inception file; without one
  the report says so and the rest runs), and the detector's p(fake) on the generated images.
* **Data parallel**: each rank takes every world-th record; rows and images are gathered, rank 0 computes the
  fidelity metrics and writes the report, and every rank returns the same results.
* **Report**: ``results.json`` (settings, metrics, skips), ``detections.jsonl`` (one row per image: p(fake), both
  labels, explanation, reference, ROUGE-L, CSS), ``report.md`` (the tables a paper would show) and, optionally,
  the generated PNGs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from unigendet.resume import gather_per_rank, world
from unigendet.skips import SkipCounter
from unigendet.text_metrics import RougeL, css, parse_label

log = logging.getLogger("unigendet.evaluation")

LABELS = ("fake", "real")  # indexed by the dataset label
WEIGHTS_ENV = "UNIGENDET_INCEPTION_WEIGHTS"


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
    out_dir: str | None = None  # None: <log dir>/eval

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size and max_new_tokens must be >= 1")
        if self.gen_px < 1:
            raise ValueError("gen_px must be >= 1")


#####################################################################################################
# detection
#####################################################################################################


def detect_rows(engine, items: list[tuple[int, Any, Any]], cfg: EvalConfig, with_vae: bool) -> list[dict]:
    """One row per (index, record, image); consecutive records asking the same question share a batch."""
    rouge = RougeL() if cfg.explain else None
    rows: list[dict] = []
    i = 0
    while i < len(items):
        prompt = items[i][1].prompt
        chunk = [items[i]]
        while i + len(chunk) < len(items) and len(chunk) < cfg.batch_size and items[i + len(chunk)][1].prompt == prompt:
            chunk.append(items[i + len(chunk)])
        i += len(chunk)
        dets = engine.detect([img for _, _, img in chunk], prompt=prompt, with_vae=with_vae, explain=cfg.explain,
                             max_new_tokens=cfg.max_new_tokens)
        for (index, rec, _), det in zip(chunk, dets, strict=True):
            row = {"index": index, "id": rec.id, "cate": rec.cate, "label": LABELS[rec.label],
                   "p_fake": det.p_fake, "head": det.label}
            if cfg.explain:
                text_label = parse_label(det.explanation)
                row.update(explanation=det.explanation, reference=rec.answer,
                           text=None if text_label is None else LABELS[text_label],
                           rouge_l=rouge(det.explanation, rec.answer), css=css(rec.answer, det.explanation))
            rows.append(row)
    return rows


def head_scores(p_fake: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Accuracy, macro-F1 and AUROC of per-sample p(fake) (N,) against dataset labels (N,) (0 = fake, 1 = real):
    fake is the positive class, predicted when p(fake) >= 0.5; AUROC is nan when only one label is present. The one
    definition behind ``val/…``, ``test/…``, the DetectionMetrics callback and the evaluation report."""
    from torchmetrics.functional.classification import binary_auroc, multiclass_f1_score

    p = p_fake.float()
    fake = (label == 0).long()
    pred = (p >= 0.5).long()
    return {"acc": float((pred == fake).float().mean()),
            "f1": float(multiclass_f1_score(pred, fake, num_classes=2, average="macro")),
            "auroc": float(binary_auroc(p, fake)) if fake.min() != fake.max() else float("nan")}


def _scores(truth: list[str], pred: list[str | None]) -> dict[str, float]:
    """Accuracy and macro-F1 over {fake, real}; a None prediction is wrong (it becomes the other label)."""
    from torchmetrics.functional.classification import multiclass_f1_score

    y = torch.tensor([LABELS.index(t) for t in truth])
    p = torch.tensor([LABELS.index(q) if q is not None else 1 - LABELS.index(t)
                      for t, q in zip(truth, pred, strict=True)])
    return {"acc": float((p == y).float().mean()),
            "f1": float(multiclass_f1_score(p, y, num_classes=2, average="macro"))}


def summarize_detection(rows: list[dict]) -> dict[str, Any]:
    """Metrics of detection rows, overall and per category."""
    if not rows:
        return {"n": 0}
    truth = [r["label"] for r in rows]
    out: dict[str, Any] = {"n": len(rows), "n_fake": truth.count("fake"), "n_real": truth.count("real")}
    out["head"] = head_scores(torch.tensor([r["p_fake"] for r in rows]), torch.tensor([LABELS.index(t) for t in truth]))
    if "text" in rows[0]:
        texts = [r["text"] for r in rows]
        out["text"] = {**_scores(truth, texts), "unparsed": sum(t is None for t in texts),
                       "agrees_with_head": sum(r["text"] == r["head"] for r in rows) / len(rows)}
        out["rouge_l"] = sum(r["rouge_l"] for r in rows) / len(rows)
        out["css"] = sum(r["css"] for r in rows) / len(rows)
    cates = sorted({r["cate"] for r in rows if r["cate"] is not None})
    if cates:
        out["per_category"] = {}
        for c in cates:
            sub = [r for r in rows if r["cate"] == c]
            entry = {"n": len(sub), "head_acc": _scores([r["label"] for r in sub], [r["head"] for r in sub])["acc"]}
            if "text" in sub[0]:
                entry["text_acc"] = _scores([r["label"] for r in sub], [r["text"] for r in sub])["acc"]
                entry["rouge_l"] = sum(r["rouge_l"] for r in sub) / len(sub)
                entry["css"] = sum(r["css"] for r in sub) / len(sub)
            out["per_category"][c] = entry
    return out


#####################################################################################################
# generation
#####################################################################################################


def fidelity_or_reason(real: list, fake: list, cfg: EvalConfig) -> dict[str, Any]:
    """FID / KID / IS of generated vs paired real images, or ``{"not_computed": why}``."""
    from unigendet.fidelity import InceptionWeightsMissing, fidelity_metrics, inception_weights

    path = cfg.inception_weights or os.environ.get(WEIGHTS_ENV)
    try:
        weights = inception_weights(path)
    except InceptionWeightsMissing as e:
        log.warning("FID/KID/IS not computed: %s", e)
        return {"not_computed": str(e)}
    if min(len(real), len(fake)) < 2:
        return {"not_computed": f"FID needs >= 2 image pairs, have {min(len(real), len(fake))}"}
    return fidelity_metrics(real, fake, weights, kid_subset_size=cfg.kid_subset_size)


#####################################################################################################
# the whole protocol over a data module
#####################################################################################################


def _t2i_side(dm):
    side = getattr(dm, "gen_dm", dm)
    return side if hasattr(side, "caption_column") else None


def _first(records, limit: int | None):
    return list(records if limit is None else records[:limit])


def _images(dm, split: str, records: list, skips: SkipCounter) -> list[tuple[int, Any, Any]]:
    """(index, record, image) for this rank's records (every world-th); unreadable ones are counted in skips."""
    rank, size = world()
    out = []
    for index in range(rank, len(records), size):
        img = dm.record_image(split, records[index], skips)
        if img is not None:
            out.append((index, records[index], img))
    return out


def _summed(gathered: list[tuple[Any, dict[str, int]]]) -> dict[str, int]:
    """The skip counts of every rank, added up by reason."""
    total = SkipCounter()
    for _, counts in gathered:
        total.counts.update(counts)
    return dict(total.counts)


def run_protocol(engine, dm, cfg: EvalConfig, *, detect_images=None) -> dict[str, Any]:
    """Evaluate the engine's model on ``dm``'s ``cfg.split``. ``detect_images(images) -> p_fake`` (head only, as
    the detection data presents images) scores the generated images; None: the engine's own detect."""
    results: dict[str, Any] = {"settings": asdict(cfg)}
    rank, size = world()
    t0 = time.perf_counter()
    rows: list[dict] = []
    if cfg.detection and hasattr(dm, "with_vae") and getattr(dm, cfg.split, None) is not None:
        engine.vit_tf, engine.vae_tf = dm.vit_tf(), dm.vae_tf()  # as the test batches see the images
        records = _first(dm.split_records(cfg.split), cfg.max_images)
        skips = SkipCounter()
        items = _images(dm, cfg.split, records, skips)
        mine = detect_rows(engine, items, cfg, dm.with_vae)
        gathered = gather_per_rank((mine, dict(skips.counts)))
        rows = sorted((r for part, _ in gathered for r in part), key=lambda r: r["index"])
        results["detection"] = {**summarize_detection(rows), "records": len(records), "skipped": _summed(gathered),
                                "with_vae": dm.with_vae}
    elif cfg.detection:
        results["detection"] = {"not_run": f"no detection {cfg.split} split in {type(dm).__name__}"}
    t2i = _t2i_side(dm)
    fake_images: list = []
    if cfg.generation and t2i is not None and getattr(t2i, cfg.split, None) is not None:
        records = _first(t2i.split_records(cfg.split), cfg.max_prompts)
        skips = SkipCounter()
        items = _images(t2i, cfg.split, records, skips)
        mine = []
        for k in range(0, len(items), cfg.batch_size):
            chunk = items[k: k + cfg.batch_size]
            images = engine.generate([rec.prompt for _, rec, _ in chunk], height=cfg.gen_px, width=cfg.gen_px,
                                     steps=cfg.gen_steps, cfg_scale=cfg.cfg_scale,
                                     seed=[cfg.seed + index for index, _, _ in chunk])
            mine += [(index, rec.prompt, real, fake) for (index, rec, real), fake in zip(chunk, images, strict=True)]
        gathered = gather_per_rank((mine, dict(skips.counts)))
        pairs = sorted((p for part, _ in gathered for p in part), key=lambda p: p[0])
        fake_images = [p[3] for p in pairs]
        gen: dict[str, Any] = {"n": len(pairs), "records": len(records), "skipped": _summed(gathered),
                               "px": cfg.gen_px}
        if pairs and hasattr(dm, "with_vae"):
            p_fake = (detect_images(fake_images) if detect_images is not None else
                      torch.tensor([d.p_fake for d in engine.detect(fake_images, explain=False,
                                                                    with_vae=dm.with_vae)]))
            gen["p_fake_mean"] = float(p_fake.float().mean())
            gen["judged_fake"] = float((p_fake >= 0.5).float().mean())
        fidelity = fidelity_or_reason([p[2] for p in pairs], fake_images, cfg) if rank == 0 else None
        gen["fidelity"] = gather_per_rank(fidelity)[0]
        gen["prompts"] = [p[1] for p in pairs]
        gen["seeds"] = [cfg.seed + p[0] for p in pairs]
        results["generation"] = gen
    elif cfg.generation:
        results["generation"] = {"not_run": f"no text-to-image {cfg.split} split in {type(dm).__name__}"}
    results["seconds"] = time.perf_counter() - t0
    results["world_size"] = size
    results["_rows"], results["_images"] = rows, fake_images
    return results


#####################################################################################################
# report
#####################################################################################################


def flat_metrics(results: dict[str, Any], prefix: str = "test/") -> dict[str, float]:
    """The scalar metrics to log: ``test/head_acc``, ``test/text_f1``, ``test/rouge_l``, ``test/fid``, ..."""
    out: dict[str, float] = {}
    det = results.get("detection", {})
    for side in ("head", "text"):
        for k, v in det.get(side, {}).items():
            out[f"{prefix}{side}_{k}"] = float(v)
    for k in ("rouge_l", "css"):
        if k in det:
            out[prefix + k] = float(det[k])
    gen = results.get("generation", {})
    for k in ("p_fake_mean", "judged_fake"):
        if k in gen:
            out[f"{prefix}gen_{k}"] = float(gen[k])
    for k, v in (gen.get("fidelity") or {}).items():
        if isinstance(v, (int, float)) and not k.startswith("n_"):
            out[prefix + k] = float(v)
    return out


def _pct(x: float) -> str:
    return "n/a" if x != x else f"{100 * x:.1f}"


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"# Evaluation on the `{s['split']}` split", ""]
    det = results.get("detection", {})
    if "not_run" in det:
        lines += [f"Detection: not run ({det['not_run']}).", ""]
    elif det:
        lines += ["## Detection", "",
                  f"{det['n']} images ({det['n_fake']} fake, {det['n_real']} real) of {det['records']} records; "
                  f"skipped: {det['skipped'] or 'none'}; VAE split (SMSA): {'on' if det['with_vae'] else 'off'}.", "",
                  "| label from | Acc | F1 | AUROC | ROUGE-L | CSS |", "|---|---|---|---|---|---|",
                  f"| head | {_pct(det['head']['acc'])} | {_pct(det['head']['f1'])} | {_pct(det['head']['auroc'])} "
                  "| | |"]
        if "text" in det:
            t = det["text"]
            lines += [f"| explanation | {_pct(t['acc'])} | {_pct(t['f1'])} | | {_pct(det['rouge_l'])} "
                      f"| {_pct(det['css'])} |", "",
                      f"Explanations naming no verdict: {t['unparsed']}; explanation agrees with the head on "
                      f"{_pct(t['agrees_with_head'])}% of images."]
        if det.get("per_category"):
            explain = "text" in det
            lines += ["", "| category | n | head Acc |" + (" text Acc | ROUGE-L | CSS |" if explain else ""),
                      "|---|---|---|" + ("---|---|---|" if explain else "")]
            for c, e in det["per_category"].items():
                row = f"| {c} | {e['n']} | {_pct(e['head_acc'])} |"
                if explain:
                    row += f" {_pct(e['text_acc'])} | {_pct(e['rouge_l'])} | {_pct(e['css'])} |"
                lines.append(row)
        lines.append("")
    gen = results.get("generation", {})
    if "not_run" in gen:
        lines += [f"Generation: not run ({gen['not_run']}).", ""]
    elif gen:
        fid = gen["fidelity"]
        lines += ["## Generation", "",
                  f"{gen['n']} captions at {gen['px']} px (steps {s['gen_steps'] or 'model default'}, "
                  f"cfg {s['cfg_scale'] if s['cfg_scale'] is not None else 'model default'}, seeds {s['seed']}+i); "
                  f"skipped real images: {gen['skipped'] or 'none'}.", ""]
        if "not_computed" in fid:
            lines.append(f"FID / KID / IS: not computed ({fid['not_computed']}).")
        else:
            lines += ["| FID | KID (x1000) | IS |", "|---|---|---|",
                      f"| {fid.get('fid', float('nan')):.2f} | {1000 * fid.get('kid_mean', float('nan')):.2f} "
                      f"± {1000 * fid.get('kid_std', float('nan')):.2f} | {fid.get('is_mean', float('nan')):.2f} "
                      f"± {fid.get('is_std', float('nan')):.2f} |"]
        if "p_fake_mean" in gen:
            lines += ["", f"The detector's mean p(fake) on the generated images: {gen['p_fake_mean']:.3f} "
                          f"({_pct(gen['judged_fake'])}% judged fake)."]
        lines.append("")
    lines.append(f"{results['world_size']} process(es), {results['seconds']:.1f} s.")
    return "\n".join(lines) + "\n"


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """results.json, detections.jsonl, report.md and (``save_images``) generated/<i>.png under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    (out / "results.json").write_text(json.dumps(public, indent=2, default=str) + "\n")
    with open(out / "detections.jsonl", "w") as f:
        for row in results.get("_rows", []):
            f.write(json.dumps(row) + "\n")
    (out / "report.md").write_text(markdown(public))
    if results["settings"].get("save_images") and results.get("_images"):
        folder = out / "generated"
        folder.mkdir(exist_ok=True)
        from PIL.PngImagePlugin import PngInfo

        gen = results["generation"]
        for i, (img, prompt, seed) in enumerate(zip(results["_images"], gen["prompts"], gen["seeds"], strict=True)):
            meta = PngInfo()
            meta.add_text("prompt", prompt)
            meta.add_text("seed", str(seed))
            img.save(folder / f"{i:05d}.png", pnginfo=meta)
    return out
