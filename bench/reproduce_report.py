"""The report of ``bench/reproduce.py``: the table, the claims' paired differences with verdicts, the learning curves.

Reads ``OUT/results.jsonl`` (complete or partial) and writes ``OUT/table.md`` (mean ± std over seeds per arm),
``OUT/claims.md`` (per claim and metric: the seed-paired difference, its 95% t-interval and a verdict) and
``OUT/curves.png`` (validation AUROC and training flow loss per arm, mean over seeds); prints the two Markdown parts.

    python bench/reproduce_report.py --out repro-run/out

Verdicts, fixed before any run: a claim that A is better than B is *reproduced* when the whole 95% interval of the
paired difference lies on the claimed side of 0, *not reproduced* when it lies wholly on the other side, and
*inconclusive* otherwise. A claim that A is at least as good as B (non-inferiority) is *reproduced* when the interval
excludes a loss larger than the margin (1 point of accuracy; 5% of B's mean distance), *not reproduced* when the whole
interval is beyond the margin, and *inconclusive* otherwise. Fewer than 2 paired seeds: *not enough seeds*.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TABLE_COLUMNS = (("head_acc", "head Acc"), ("head_f1", "head F1"), ("head_auroc", "AUROC"), ("rouge_l", "ROUGE-L"),
                 ("verdict_acc", "verdict Acc"), ("feat_fd", "feature FD"), ("demo_fd", "demo FD"), ("fid", "FID"),
                 ("gen_p_fake", "p(fake) on generated"), ("fit_s", "train s"))
ONE_DIGIT = ("feat_fd", "fid", "fit_s", "wall_s")


@dataclass(frozen=True)
class Claim:
    name: str
    a: str  # the arm the claim favours
    b: str
    metric: str
    higher_is_better: bool
    kind: str = "better"  # "better" or "non-inferior"
    margin: float = 0.0  # non-inferior: absolute (accuracy) or, when relative, a fraction of b's mean
    relative: bool = False


CLAIMS = (
    Claim("SMSA improves detection (paper: Acc 98.0 vs 95.0)", "gduf", "gduf_no_smsa", "head_acc", True),
    Claim("SMSA improves detection (paper: F1 97.7 vs 94.6)", "gduf", "gduf_no_smsa", "head_f1", True),
    Claim("SMSA improves explanations (paper: ROUGE-L 56.3 vs 50.9)", "gduf", "gduf_no_smsa", "rouge_l", True),
    Claim("DIGA improves generation (paper: FID 17.5 vs 19.4)", "gduf_diga", "gen_no_diga", "feat_fd", False),
    Claim("DIGA improves generation (paper: FID 17.5 vs 19.4)", "gduf_diga", "gen_no_diga", "demo_fd", False),
    Claim("DIGA improves generation (paper: FID 17.5 vs 19.4)", "gduf_diga", "gen_no_diga", "fid", False),
    Claim("DIGA makes samples look real to the detector (no paper number)", "gduf_diga", "gen_no_diga", "gen_p_fake",
          False),
    Claim("co-evolution >= serial GDUF -> DIGA, detection", "coevolve", "gduf_diga", "head_acc", True,
          "non-inferior", 0.01),
    Claim("co-evolution >= serial GDUF -> DIGA, generation", "coevolve", "gduf_diga", "feat_fd", False,
          "non-inferior", 0.05, True),
    Claim("co-evolution >= serial GDUF -> DIGA, generation", "coevolve", "gduf_diga", "demo_fd", False,
          "non-inferior", 0.05, True),
    Claim("co-evolution >= serial GDUF -> DIGA, generation", "coevolve", "gduf_diga", "fid", False,
          "non-inferior", 0.05, True),
)
CONTEXT = (Claim("GDUF head vs the CNN at equal wall time (context, no claim)", "gduf", "cnn", "head_acc", True),
           Claim("co-evolution head vs the CNN at equal wall time (context, no claim)", "coevolve", "cnn", "head_acc",
                 True))


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def mean_std(values: list) -> tuple[float, float, int] | None:
    vals = [x for x in map(_num, values) if x is not None]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def t_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean of ``diffs`` (n >= 2)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=float)
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def verdict(claim: Claim, low: float, high: float, b_mean: float) -> str:
    """The verdict on a paired difference a - b with 95% interval [low, high] (rules: the module's docstring)."""
    sign = 1.0 if claim.higher_is_better else -1.0
    lo, hi = sorted((sign * low, sign * high))  # in "better" units: > 0 favours a
    if claim.kind == "better":
        return "reproduced" if lo > 0 else "not reproduced" if hi < 0 else "inconclusive at this budget"
    margin = claim.margin * abs(b_mean) if claim.relative else claim.margin
    return "reproduced" if lo > -margin else "not reproduced" if hi < -margin else "inconclusive at this budget"


def paired(rows: list[dict], claim: Claim) -> dict | None:
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted(s for (arm, s) in by if arm == claim.a and (claim.b, s) in by
                   and _num(by[(arm, s)].get(claim.metric)) is not None
                   and _num(by[(claim.b, s)].get(claim.metric)) is not None)
    if not seeds:
        return None
    diffs = [by[(claim.a, s)][claim.metric] - by[(claim.b, s)][claim.metric] for s in seeds]
    b_mean = float(np.mean([by[(claim.b, s)][claim.metric] for s in seeds]))
    if len(seeds) < 2:
        return {"seeds": seeds, "mean": diffs[0], "low": None, "high": None, "verdict": "not enough seeds",
                "b_mean": b_mean}
    mean, low, high = t_interval(diffs)
    return {"seeds": seeds, "mean": mean, "low": low, "high": high, "b_mean": b_mean,
            "verdict": verdict(claim, low, high, b_mean)}


def _fmt(v: float, key: str) -> str:
    return f"{v:.1f}" if key in ONE_DIGIT else f"{v:.3f}"


def table(rows: list[dict]) -> str:
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    lines = ["| arm | seeds | " + " | ".join(t for _, t in TABLE_COLUMNS) + " |",
             "|---|---|" + "---:|" * len(TABLE_COLUMNS)]
    for arm in arms:
        sub = [r for r in rows if r["arm"] == arm]
        cells = []
        for key, _ in TABLE_COLUMNS:
            ms = mean_std([r.get(key) for r in sub])
            if ms is None:
                note = next((r.get("fid_note") for r in sub if r.get("fid_note")), None) if key == "fid" else None
                cells.append(note or "–")
            else:
                cells.append(f"{_fmt(ms[0], key)} ± {_fmt(ms[1], key)}")
        lines.append(f"| {arm} | {','.join(str(r['seed']) for r in sub)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def claims_table(rows: list[dict]) -> str:
    lines = ["| claim | A - B | metric | seeds | mean difference | 95% interval | verdict |",
             "|---|---|---|---|---:|---|---|"]
    for claim in CLAIMS + CONTEXT:
        p = paired(rows, claim)
        if p is None:
            continue
        interval = "–" if p["low"] is None else f"[{_fmt(p['low'], claim.metric)}, {_fmt(p['high'], claim.metric)}]"
        better = ("higher" if claim.higher_is_better else "lower") + " is better"
        if claim.kind == "non-inferior":
            margin = claim.margin * abs(p["b_mean"]) if claim.relative else claim.margin
            better += f"; margin {_fmt(margin, claim.metric)}"
        verdict_text = "context" if claim in CONTEXT else p["verdict"]
        lines.append(f"| {claim.name} | {claim.a} - {claim.b} | {claim.metric} ({better}) | "
                     f"{','.join(map(str, p['seeds']))} | {_fmt(p['mean'], claim.metric)} | {interval} | "
                     f"{verdict_text} |")
    return "\n".join(lines) + "\n"


def read_curve(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{metric: (steps, values)} of a Lightning CSVLogger metrics.csv (empty cells dropped)."""
    import csv

    cols: dict[str, list[tuple[int, float]]] = {}
    with open(path) as f:
        for rec in csv.DictReader(f):
            for key, v in rec.items():
                if key != "step" and v not in ("", None):
                    cols.setdefault(key, []).append((int(rec["step"]), float(v)))
    return {k: (np.array([s for s, _ in v]), np.array([x for _, x in v])) for k, v in cols.items()}


def arm_curve(row: dict, key: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One run's ``key`` over its whole training (a serial arm's second stage continues its GDUF half's steps)."""
    xs, ys, offset = [], [], 0
    for path in row.get("curves", []):
        if not Path(path).exists():
            return None
        curve = read_curve(path)
        steps_here = max((int(s.max()) for s, _ in curve.values() if len(s)), default=0) + 1
        if key in curve:
            xs.append(curve[key][0] + offset)
            ys.append(curve[key][1])
        offset += steps_here
    return (np.concatenate(xs), np.concatenate(ys)) if xs else None


def curves_png(rows: list[dict], path: Path) -> Path | None:
    """Validation AUROC and the training flow loss (moving average over 50 steps) per arm, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in dict.fromkeys(r["arm"] for r in rows) if any(r.get("curves") for r in rows if r["arm"] == a)]
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for arm in arms:
        for ax, key, window in ((axes[0], "val/auroc", 1), (axes[1], "train/loss_mse", 5)):
            runs = [c for r in rows if r["arm"] == arm and (c := arm_curve(r, key)) is not None]
            if not runs:
                continue
            grid = np.unique(np.concatenate([s for s, _ in runs]))
            ys = np.mean([np.interp(grid, s, y) for s, y in runs], axis=0)
            if window > 1 and len(ys) > window:
                ys = np.convolve(ys, np.ones(window) / window, mode="valid")
                grid = grid[window - 1:]
            seeds = f"{len(runs)} seed" + ("s" if len(runs) > 1 else "")
            ax.plot(grid, ys, marker="o" if key.startswith("val") else None, label=f"{arm} ({seeds})")
    axes[0].set(title="validation AUROC (EMA weights)", xlabel="step", ylabel="AUROC")
    axes[1].set(title="training flow-matching MSE (moving average)", xlabel="step", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="repro-run/out", help="the folder holding results.jsonl")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    settings = rows[0]["settings"] if rows else {}
    ref = json.loads((out / "reference.json").read_text()) if (out / "reference.json").exists() else {}
    head = (f"{settings.get('steps')} optimizer steps per model arm; mean ± std (n-1) over seeds. Detection: the "
            f"head on every test image; ROUGE-L / verdict Acc on {settings.get('panel')} explained test images. "
            f"Generation: {settings.get('fd_prompts')} held-out captions at 32 px, {settings.get('gen_steps')} steps.")
    if ref:
        net, floor = ref["feature_net"], ref["floor"]
        head += (f" Feature FD: Fréchet distance in a source classifier trained here on the corpus' real images "
                 f"(held-out accuracy {net['heldout_acc']:.3f}, {net['classes']} classes, majority class "
                 f"{net['majority_class']:.3f}); real val vs real test images score {floor['feat_fd']:.1f} "
                 f"(demo FD {floor['demo_fd']:.2f}), the floor.")
    md_table = head + "\n\n" + table(rows)
    md_claims = claims_table(rows)
    (out / "table.md").write_text(md_table)
    (out / "claims.md").write_text(md_claims)
    png = curves_png(rows, out / "curves.png")
    print(md_table + "\n" + md_claims + (f"\ncurves: {png}" if png else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
