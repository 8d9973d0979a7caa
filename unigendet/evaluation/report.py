"""The evaluation report: ``results.json``, ``detections.jsonl``, ``report.md`` with its figures, and the flat
``test/...`` metrics for loggers."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("unigendet.evaluation.protocol")

FIGURES = (("roc.png", "ROC curve of the real/fake head (fake = positive)"),
           ("confusion_matrix.png", "Confusion matrix of the real/fake head"),
           ("per_category.png", "Head accuracy per category"))


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


def detection_figures(rows: list[dict], det: dict[str, Any], out_dir: str | os.PathLike) -> list[tuple]:
    """Draw :data:`FIGURES` of the detection rows into ``out_dir``: ``(file, title, None)`` for each one drawn,
    ``(file, title, why)`` for each one that could not be (its stale file from an earlier report removed)."""
    from unigendet.evaluation import plots

    draw = {"roc.png": lambda path: plots.roc_curve_png([r["p_fake"] for r in rows], [r["label"] for r in rows], path),
            "confusion_matrix.png": lambda path: plots.confusion_matrix_png([r["head"] for r in rows],
                                                                            [r["label"] for r in rows], path),
            "per_category.png": lambda path: plots.per_category_png(det.get("per_category") or rows, path)}
    out = []
    for name, title in FIGURES:
        path = Path(out_dir) / name
        try:
            draw[name](path)
            out.append((name, title, None))
        except Exception as e:  # a figure is never worth losing the report over
            expected = isinstance(e, ValueError)  # the plots' own "cannot be drawn: why"
            if not expected:
                log.warning("evaluation figure %s not drawn", name, exc_info=True)
            path.unlink(missing_ok=True)
            out.append((name, title, str(e) if expected else f"{type(e).__name__}: {e}"))
    return out


def markdown(results: dict[str, Any], figures: list[tuple] | None = None) -> str:
    """The report; ``figures``: :func:`detection_figures`' list, linked (or explained) under the detection tables."""
    s = results["settings"]
    lines = [f"# Evaluation on the `{s['split']}` split", ""]
    det = results.get("detection", {})
    if "not_run" in det:
        lines += [f"Detection: not run ({det['not_run']}).", ""]
    elif det and not det.get("n"):
        lines += [f"Detection: no readable image among {det.get('records', 0)} records "
                  f"(skipped: {det.get('skipped') or 'none'}).", ""]
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
        for name, title, why in figures or []:
            lines += ["", f"![{title}]({name})" if why is None else f"{title}: not drawn ({why})."]
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


def _collect_pngs(png_dirs: list[str], folder: Path) -> None:
    """Move the PNGs that ranks saved elsewhere (a temporary folder) into ``folder``; those already there stay."""
    for d in map(Path, png_dirs):
        if not d.is_dir() or d.resolve() == folder.resolve():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for png in sorted(d.glob("*.png")):
            shutil.move(str(png), folder / png.name)
        with contextlib.suppress(OSError):
            d.rmdir()


def write_report(results: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """results.json, detections.jsonl, report.md with its figures (roc.png, confusion_matrix.png, per_category.png)
    and (``save_images``) the generated PNGs, which :func:`run_protocol` saved, under ``out_dir/generated``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    (out / "results.json").write_text(json.dumps(public, indent=2, default=str) + "\n")
    rows = results.get("_rows", [])
    with open(out / "detections.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    figures = detection_figures(rows, public.get("detection", {}), out) if rows else None
    (out / "report.md").write_text(markdown(public, figures))
    _collect_pngs(results.get("_png_dirs", []), out / "generated")
    return out
