"""Pictures where people look: the evaluation report's figures, training loss curves and captioned sample grids.

Features:

* **The report's figures** (``unigendet test`` writes them next to ``report.md``): :func:`roc_curve_png` (ROC of the
  fake class, which is label 0 in FakeClue and the positive class everywhere here, scored by p(fake), with the AUROC
  of :func:`torchmetrics.functional.classification.binary_auroc` in the title, the definition
  :func:`unigendet.evaluation.scores.head_scores` uses), :func:`confusion_matrix_png` (rows: the truth, columns: the
  prediction, counts and row percentages) and :func:`per_category_png` (accuracy per ``cate`` with the image count
  above each bar, from detection rows or from ``summarize_detection(...)["per_category"]``).
* **Progress curves** (:func:`progress_curves_png`): validation accuracy per family against the step next to the
  training losses (the demo's ``curves.png``).
* **Loss curves** from a ``steps.jsonl`` of :class:`callbacks.step_log.StepLog` (:func:`loss_curves_png`): one panel
  per ``train/loss*`` key on its own scale, against the step, with a moving average once there are many steps.
* **Captioned grids** (:func:`caption_grid`): images tiled in rows with each one's caption wrapped under it to the
  image width (PIL's default font); long captions end in "..." after ``max_lines`` lines, empty ones leave a blank.
* **Refuses with a reason**: a figure that cannot be drawn (one label only for a ROC, no categories, no loss values)
  raises ``ValueError`` saying why, and the report prints that reason instead of the picture.
* **No global state**: matplotlib's ``Figure`` on an Agg canvas, never ``pyplot``: nothing opens a window and the
  process's matplotlib backend is left as it was.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

LABELS = ("fake", "real")  # indexed by the dataset label: 0 = fake (the positive class), 1 = real
DPI = 100


########################################################################################################################
# helpers
########################################################################################################################
def _label_ids(labels: Iterable) -> np.ndarray:
    """Dataset labels as ints, 0 = fake and 1 = real, from ints or from the strings "fake" / "real"."""
    out = []
    for x in labels:
        if isinstance(x, str):
            if x not in LABELS:
                raise ValueError(f"label {x!r} is neither 'fake' nor 'real'")
            out.append(LABELS.index(x))
        else:
            out.append(int(x))
    ids = np.asarray(out, dtype=np.int64)
    if ids.size and not np.isin(ids, (0, 1)).all():
        raise ValueError(f"labels must be 0 (fake) or 1 (real), got {sorted(set(ids.tolist()))}")
    return ids


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=DPI)
    return path


########################################################################################################################
# the evaluation report
########################################################################################################################
def roc_curve_png(p_fake: Sequence[float], labels: Sequence, path: str | os.PathLike) -> Path:
    """The ROC curve of the fake class (true-positive rate: fakes with p(fake) >= t among fakes; false-positive
    rate: real images above t among real ones), with the AUROC in the title and the chance diagonal.

    Args:
        p_fake: per image, the detector's p(fake).
        labels: per image, the dataset label: 0 or "fake", 1 or "real".
        path: the PNG to write.

    Returns:
        ``path``.

    Raises:
        ValueError: the lengths differ, or only one label is present (no ROC without both).
    """
    import torch
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    ids = _label_ids(labels)
    if len(p_fake) != len(ids):
        raise ValueError(f"{len(p_fake)} scores for {len(ids)} labels")
    n_fake, n_real = int((ids == 0).sum()), int((ids == 1).sum())
    if not n_fake or not n_real:
        raise ValueError(f"a ROC needs both labels, have {n_fake} fake and {n_real} real images")
    scores, fake = torch.tensor(np.asarray(p_fake, dtype=np.float32)), torch.from_numpy((ids == 0).astype(np.int64))
    fpr, tpr, _ = binary_roc(scores, fake)
    auroc = float(binary_auroc(scores, fake))
    fig = _figure(5, 5)
    ax = fig.add_subplot()
    ax.plot(fpr.numpy(), tpr.numpy(), color="C0", lw=2, label=f"head (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate (real judged fake)",
           ylabel="true-positive rate (fake judged fake)",
           title=f"ROC, fake = positive: AUROC {auroc:.3f}\n({n_fake} fake, {n_real} real)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def confusion_matrix_png(pred: Sequence, labels: Sequence, path: str | os.PathLike) -> Path:
    """The 2 x 2 confusion matrix over {fake, real}: rows the truth, columns the prediction, each cell its count and
    its share of the row; accuracy in the title.

    Args:
        pred: per image, the predicted label: 0 or "fake", 1 or "real".
        labels: per image, the dataset label, in the same form.
        path: the PNG to write.

    Returns:
        ``path``.

    Raises:
        ValueError: no images, or the lengths differ.
    """
    truth, guess = _label_ids(labels), _label_ids(pred)
    if len(truth) != len(guess):
        raise ValueError(f"{len(guess)} predictions for {len(truth)} labels")
    if not len(truth):
        raise ValueError("no images")
    counts = np.zeros((2, 2), dtype=np.int64)
    np.add.at(counts, (truth, guess), 1)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig = _figure(4.6, 4.2)
    ax = fig.add_subplot()
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{counts[i, j]}\n({100 * share[i, j]:.1f}%)", ha="center", va="center", fontsize=12,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks([0, 1], LABELS)
    ax.set_yticks([0, 1], LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"Confusion matrix: accuracy {100 * np.trace(counts) / counts.sum():.1f}% of {counts.sum()}")
    return _save(fig, path)


def _category_stats(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """{cate: {n, head_acc[, text_acc]}} of detection rows (``label``, ``head``, optionally ``text``; a None text
    label is wrong)."""
    out: dict[str, dict[str, float]] = {}
    groups: dict[str, list] = {}
    for r in rows:
        if r.get("cate") is not None:
            groups.setdefault(str(r["cate"]), []).append(r)
    for c in sorted(groups):
        sub = groups[c]
        entry = {"n": len(sub), "head_acc": sum(r["head"] == r["label"] for r in sub) / len(sub)}
        if "text" in sub[0]:
            entry["text_acc"] = sum(r.get("text") == r["label"] for r in sub) / len(sub)
        out[c] = entry
    return out


def per_category_png(rows_or_stats: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, float]],
                     path: str | os.PathLike) -> Path:
    """Accuracy per category (``cate``): one bar per category for the head (and one for the explanation's label
    when there is one), the image count above each group.

    Args:
        rows_or_stats: detection rows (dicts with ``cate``, ``label``, ``head``, optionally ``text``), or the
            ``{cate: {"n", "head_acc"[, "text_acc"]}}`` of :func:`unigendet.evaluation.scores.summarize_detection`.
        path: the PNG to write.

    Returns:
        ``path``.

    Raises:
        ValueError: no image has a category.
    """
    stats = dict(rows_or_stats) if isinstance(rows_or_stats, Mapping) else _category_stats(rows_or_stats)
    if not stats:
        raise ValueError("no categories (no image has a `cate`)")
    names = list(stats)
    sides = [("head_acc", "head")] + ([("text_acc", "explanation")] if "text_acc" in stats[names[0]] else [])
    x = np.arange(len(names))
    width = 0.8 / len(sides)
    fig = _figure(min(max(5.0, 0.7 * len(names) * len(sides) + 2.0), 30.0), 4.5)
    ax = fig.add_subplot()
    for k, (key, label) in enumerate(sides):
        acc = [100 * float(stats[c][key]) for c in names]
        ax.bar(x + (k - (len(sides) - 1) / 2) * width, acc, width, label=label, color=f"C{k}")
    for i, c in enumerate(names):
        top = max(100 * float(stats[c][key]) for key, _ in sides)
        ax.text(i, top + 1.5, f"n={int(stats[c]['n'])}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    ax.set(ylim=(0, 112), ylabel="accuracy (%)", title=f"Accuracy per category ({len(names)})")
    ax.axhline(50, color="gray", ls=":", lw=1)
    ax.grid(axis="y", alpha=0.3)
    if len(sides) > 1:
        ax.legend(loc="upper right", fontsize=9)
    return _save(fig, path)


########################################################################################################################
# training
########################################################################################################################
def _read_steps(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """{step: values} of a StepLog file, the last line of a step winning (a resumed run retrains some steps); the
    reading of ``callbacks.step_log.read_step_log``, which ``unigendet`` may not import."""
    rows: dict[int, dict[str, float]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            step = int(row.pop("step"))
            rows[step] = {k: (math.nan if v is None else float(v)) for k, v in row.items()}
    return rows


def _moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """The trailing mean over the last ``window`` steps' finite values (NaNs ignored), kept inside the values' range
    (float error must not turn a constant loss into a curve)."""
    ok = np.isfinite(y)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, y, 0.0), kernel)[: len(y)]
    n = np.convolve(ok.astype(np.float64), kernel)[: len(y)]
    mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    return np.clip(mean, np.nanmin(y), np.nanmax(y)) if ok.any() else mean


def loss_curves_png(steps_jsonl_path: str | os.PathLike, out_path: str | os.PathLike,
                    keys: Sequence[str] | None = None) -> Path:
    """Every ``train/loss*`` value of a ``steps.jsonl`` (or ``keys``) against the step, one panel per key.

    Args:
        steps_jsonl_path: a file written by :class:`callbacks.step_log.StepLog` (one JSON object per line with
            ``step`` and the logged values).
        out_path: the PNG to write.
        keys: the keys to plot, in this order; None: every key starting with ``train/loss``, sorted.

    Returns:
        ``out_path``.

    Raises:
        ValueError: the file has no steps, or none of the keys has a value.
    """
    rows = _read_steps(steps_jsonl_path)
    if not rows:
        raise ValueError(f"{steps_jsonl_path}: no steps")
    if keys is None:
        keys = sorted({k for v in rows.values() for k in v if k.startswith("train/loss")})
    steps = np.asarray(sorted(rows))
    series = {k: np.asarray([rows[s].get(k, math.nan) for s in steps], dtype=np.float64) for k in keys}
    series = {k: y for k, y in series.items() if np.isfinite(y).any()}
    if not series:
        raise ValueError(f"{steps_jsonl_path}: no values for {list(keys) or 'train/loss*'}")
    n_cols = min(3, len(series))
    n_rows = math.ceil(len(series) / n_cols)
    fig = _figure(4.2 * n_cols, 3.0 * n_rows)
    window = max(1, len(steps) // 20)
    for i, (key, y) in enumerate(series.items()):
        ax = fig.add_subplot(n_rows, n_cols, i + 1)
        ok = np.isfinite(y)
        smooth = window > 1
        ax.plot(steps[ok], y[ok], color="C0", lw=1, alpha=0.35 if smooth else 1.0,
                marker="o" if ok.sum() <= 30 else None, ms=3, label="per step")
        if smooth:
            ax.plot(steps[ok], _moving_average(y, window)[ok], color="C1", lw=1.5, label=f"mean of {window}")
            ax.legend(fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    return _save(fig, out_path)


def progress_curves_png(val: Sequence[Mapping[str, Any]], train: Mapping[int, Mapping[str, float]],
                        out_path: str | os.PathLike, loss_keys: Sequence[str] = ("train/loss_det", "train/loss_mse"),
                        ) -> Path:
    """How a run learned: validation accuracy per category (and overall, and AUROC) against the step, and the
    training losses beside it.

    Args:
        val: one row per validation, ``{"step", "acc", "auroc" (may be None), "per_family": {cate: acc}}``.
        train: ``{step: {key: value}}`` of the training steps.
        out_path: the PNG to write.
        loss_keys: the training values to plot, one panel each (missing ones are left out).

    Raises:
        ValueError: no validation rows.
    """
    if not val:
        raise ValueError("no validation results to plot")
    keys = [k for k in loss_keys if any(k in v for v in train.values())]
    fig = _figure(4.6 * (1 + len(keys)), 3.4)
    ax = fig.add_subplot(1, 1 + len(keys), 1)
    steps = [int(r["step"]) for r in val]
    for i, fam in enumerate(sorted({f for r in val for f in r.get("per_family", {})})):
        ys = [r.get("per_family", {}).get(fam, math.nan) for r in val]
        ax.plot(steps, ys, marker="o", ms=3, lw=1, color=f"C{i}", label=fam)
    ax.plot(steps, [r["acc"] for r in val], marker="s", ms=4, lw=2, color="black", label="all (acc)")
    if any(r.get("auroc") is not None for r in val):
        ax.plot(steps, [math.nan if r.get("auroc") is None else r["auroc"] for r in val], ls="--", lw=1.5,
                color="grey", label="all (AUROC)")
    ax.axhline(0.5, color="grey", lw=0.6, ls=":")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("validation: head accuracy per family", fontsize=10)
    ax.set_xlabel("step")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    t_steps = np.asarray(sorted(train))
    for j, key in enumerate(keys):
        y = np.asarray([train[s].get(key, math.nan) for s in t_steps], dtype=np.float64)
        window = max(1, len(t_steps) // 20)
        bx = fig.add_subplot(1, 1 + len(keys), 2 + j)
        ok = np.isfinite(y)
        bx.plot(t_steps[ok], y[ok], color="C0", lw=1, alpha=0.35 if window > 1 else 1.0, label="per step")
        if window > 1:
            bx.plot(t_steps[ok], _moving_average(y, window)[ok], color="C1", lw=1.5, label=f"mean of {window}")
            bx.legend(fontsize=8)
        bx.set_title(key, fontsize=10)
        bx.set_xlabel("step")
        bx.grid(alpha=0.3)
    return _save(fig, out_path)


########################################################################################################################
# sample grids
########################################################################################################################
def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def _fits(draw, text: str, font, width: int) -> bool:
    return draw.textlength(text, font=font) <= width


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels, at spaces, inside words that do not fit on a line of
    their own; at most ``max_lines`` lines, the last ending in "..." when text was left out."""
    lines: list[str] = []
    for para in str(text).splitlines() or [""]:
        line = ""
        for word in para.split():
            candidate = f"{line} {word}" if line else word
            if _fits(draw, candidate, font, width):
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:  # a word wider than the image: split it wherever it runs out of room
                if line and not _fits(draw, line + ch, font, width):
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and not _fits(draw, last + "...", font, width):
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines


def caption_grid(images: Sequence, captions: Sequence[str], n_cols: int, max_lines: int = 6):
    """The images in rows of ``n_cols`` (top-left first) on white, each with its caption wrapped under it.

    Every cell is the first image's size plus one caption band, as tall as the longest caption needs (at most
    ``max_lines`` lines, the rest cut with "..."); images are pasted at their cell's top-left corner (a larger one
    cropped to the cell).

    Args:
        images: PIL images.
        captions: one string per image (may be empty or very long).
        n_cols: images per row.
        max_lines: the most caption lines under an image.

    Returns:
        The grid, an RGB PIL image.

    Raises:
        ValueError: no images, a caption count that differs from the image count, or ``n_cols`` / ``max_lines``
            below 1.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images")
    if len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    if n_cols < 1 or max_lines < 1:
        raise ValueError(f"n_cols and max_lines must be >= 1, got {n_cols} and {max_lines}")
    w, h = images[0].size
    font = _font()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad = 2
    wrapped = [_wrap(scratch, c, font, max(1, w - 2 * pad), max_lines) for c in captions]
    line_h = font.getbbox("Ag")[3] + 2
    band = pad + max(1, max(len(lines) for lines in wrapped)) * line_h + pad
    cols = min(n_cols, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * (h + band)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, lines) in enumerate(zip(images, wrapped, strict=True)):
        x, y = (i % cols) * w, (i // cols) * (h + band)
        grid.paste(img.convert("RGB").crop((0, 0, min(w, img.width), min(h, img.height))), (x, y))  # not over a caption
        for k, line in enumerate(lines):
            draw.text((x + pad, y + h + pad + k * line_h), line, fill="black", font=font)
    return grid
