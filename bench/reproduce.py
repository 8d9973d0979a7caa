"""Baseline and ablations on the demo corpus at an equal budget of optimizer steps (CPU), over several seeds.

Arms (each trained by a real ``python -m unigendet fit`` subprocess with the ``demo`` preset, then evaluated by
``python -m unigendet test`` with the evaluation protocol on the test splits):

* ``gduf``          - GDUF (experiments/gduf.yaml: one joint update), detection samples WITH the VAE split (SMSA);
* ``gduf_no_smsa``  - the same without the VAE split (experiments/ablations/wo_smsa.yaml);
* ``gen_no_diga``   - GDUF for steps/2, then steps/2 of generation-only training (detector frozen, no DIGA)
                      from the GDUF export (``--model.init_from``);
* ``gduf_diga``     - GDUF for steps/2, then steps/2 of DIGA (experiments/diga.yaml) from the same export;
* ``coevolve``      - the co-evolution loop (experiments/coevolve.yaml) for steps;
* ``cnn``           - a classic discriminative detector (timm ResNet-18, CNNSpot-style, from scratch, AdamW) on the
                      same detection train split, for steps optimizer steps of ``--cnn-batch`` images.

Every arm uses the same optimiser settings (experiments/demo.yaml's: the papers' LRs are for fine-tuning a 7B
model, the demo preset trains from scratch); the loss weights and schedules are each experiment file's. One JSON
line per (arm, seed) goes to stdout and ``OUT/results.jsonl``; the Markdown table (mean ± std over seeds) goes to
``OUT/table.md`` and stdout. FID/KID need a local Inception file (``UNIGENDET_INCEPTION_WEIGHTS``); the script
always adds a pixel-space Fréchet distance on 32x32 thumbnails (``pixel_fd32``), which needs no weights.

    python bench/reproduce.py --work /tmp/repro --out bench-out/repro          # the table (3 seeds)
    python bench/reproduce.py --smoke --arms gduf cnn --work /tmp/w --out /tmp/o
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"
ARMS = ("gduf", "gduf_no_smsa", "gen_no_diga", "gduf_diga", "coevolve", "cnn")
# experiments/demo.yaml's optimiser and EMA, shared by every arm
OPTIM = ["--model.ema_decay=0.95", "--model.optim.lr_det=2.0e-3", "--model.optim.lr_gen=1.0e-3",
         "--model.optim.weight_decay=0.01", "--model.optim.schedule=cosine"]
THUMB = 32  # pixel-space Fréchet distance on THUMBxTHUMB thumbnails
CNN_PX = 64  # the CNN sees a centre crop of this size (every corpus image is >= 64 px per side): no resampling


#####################################################################################################
# subprocess runs of the CLI
#####################################################################################################


def _sh(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed (rc {proc.returncode}); see {log}:\n"
                           + log.read_text()[-3000:])
    return time.perf_counter() - t0


def _configs(*names: str) -> list[str]:
    return [f"--config={EXPERIMENTS / n}" for n in ("base.yaml", "gduf.yaml", *names)]


def arm_args(arm: str, stage: str, steps: int) -> list[str]:
    """CLI arguments of one training stage ("gduf" = the GDUF half of the serial arms)."""
    if stage == "gduf":
        arm = "gduf"
    diga_stage = ["--model.stage.diga_layer=2", "--model.stage.teacher=frozen"]  # demo preset: 4 layers
    return {
        "gduf": _configs() + ["--data.with_vae=true"],
        "gduf_no_smsa": _configs("ablations/wo_smsa.yaml"),
        "gduf_diga": _configs("diga.yaml") + diga_stage,
        "gen_no_diga": _configs("diga.yaml") + diga_stage + ["--model.stage.diga=false",
                                                             "--data.gen.teacher=false"],
        # the co-evolution cadences, scaled from a 1000-step run to this budget; fresh fakes at the corpus' size
        "coevolve": _configs("coevolve.yaml") + [
            f"--model.stage.teacher_refresh={max(1, steps // 10)}",
            f"--model.stage.fresh_fakes_every={max(1, steps // 20)}", "--model.stage.fresh_fakes=2",
            "--model.stage.fresh_fake_px=64", "--model.stage.fresh_fake_steps=10"],
    }[arm]


def common_args(corpus: Path, root: Path, steps: int, seed: int) -> list[str]:
    det, t2i = corpus / "detection", corpus / "t2i"
    trainer_cfg = root / "trainer.yaml"
    trainer_cfg.write_text(json.dumps({"trainer": {"callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": 0, "monitor": None}}]}}))
    return [f"--config={trainer_cfg}", "--model.model_name=demo", *OPTIM,
            f"--model.optim.warmup_steps={max(1, steps // 15)}",  # demo.yaml: 20 of 300
            # the seed must reach the model (init, noise) and the data (order): seed_everything alone reaches neither
            f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}",
            f"--trainer.max_steps={steps}", "--trainer.accelerator=cpu",
            "--trainer.devices=1", "--trainer.logger=false", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
            f"--data.train={det / 'train.json'}", f"--data.val={det / 'val.json'}",
            f"--data.tokenizer={corpus / 'tokenizer.json'}", "--data.image_root=null", "--data.num_workers=1",
            "--data.token_budget=2048", f"--data.gen.train={t2i / 'train.jsonl'}",
            f"--data.gen.val={t2i / 'val.jsonl'}", "--data.gen.token_budget=1024", "--data.gen.image_column=image",
            "--data.gen.caption_column=caption"]


def fit(arm: str, stage: str, corpus: Path, root: Path, steps: int, seed: int, init_from: Path | None) -> float:
    root.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "unigendet", "fit", *arm_args(arm, stage, steps),
           *common_args(corpus, root, steps, seed), f"--model.init_from={init_from or 'null'}"]
    return _sh(cmd, root / "fit.log")


def export(ckpt: Path, out: Path) -> float:
    return _sh([sys.executable, "-m", "unigendet", "export", "--ckpt", str(ckpt), "--out", str(out)],
               out.parent / "export.log")


def test(arm: str, corpus: Path, root: Path, steps: int, seed: int, ev: dict) -> dict:
    out = root / "eval"
    cmd = [sys.executable, "-m", "unigendet", "test", *arm_args(arm, arm, steps),
           *common_args(corpus, root, steps, seed), "--model.init_from=null",
           f"--data.test={corpus / 'detection/test.json'}", f"--data.gen.test={corpus / 't2i/test.jsonl'}",
           "--trainer.limit_test_batches=4", f"--model.evaluation.max_images={ev['images']}",
           f"--model.evaluation.max_new_tokens={ev['max_new_tokens']}",
           f"--model.evaluation.max_prompts={ev['prompts']}", f"--model.evaluation.gen_px={ev['px']}",
           f"--model.evaluation.gen_steps={ev['gen_steps']}", "--model.evaluation.batch_size=8",
           f"--model.evaluation.seed={seed}", f"--model.evaluation.out_dir={out}",
           f"--ckpt_path={root / 'ckpt' / 'last.ckpt'}"]
    _sh(cmd, root / "test.log")
    return json.loads((out / "results.json").read_text())


#####################################################################################################
# metrics computed here
#####################################################################################################


def thumbnails(images) -> np.ndarray:
    """(N, THUMB*THUMB*3) in [0, 1]: centre square crop, bicubic resize."""
    from PIL import Image

    rows = []
    for img in images:
        img = img.convert("RGB")
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((THUMB, THUMB), Image.BICUBIC)
        rows.append(np.asarray(img, dtype=np.float64).reshape(-1) / 255.0)
    return np.stack(rows)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to the rows of a and b. With fewer samples than dimensions the
    covariances are low-rank: Tr sqrt(Sa Sb) is the nuclear norm of Ac Bc^T / sqrt((n-1)(m-1)) (exact)."""
    ca, cb = a - a.mean(0), b - b.mean(0)
    n, m = len(a), len(b)
    cross = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt((n - 1) * (m - 1))
    tr_a, tr_b = (ca ** 2).sum() / (n - 1), (cb ** 2).sum() / (m - 1)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + tr_a + tr_b - 2 * cross)


def pixel_fd(corpus: Path, eval_dir: Path, n: int) -> float:
    from PIL import Image

    pngs = sorted((eval_dir / "generated").glob("*.png"))
    recs = [json.loads(line) for line in (corpus / "t2i" / "test.jsonl").read_text().splitlines()[:len(pngs)]]
    real = [Image.open(corpus / "t2i" / r["image_path"]) for r in recs]
    if len(pngs) < 2:
        return float("nan")
    return frechet(thumbnails(real), thumbnails(Image.open(p) for p in pngs))


def model_row(results: dict, corpus: Path, eval_dir: Path) -> dict:
    det, gen = results.get("detection", {}), results.get("generation", {})
    fid = gen.get("fidelity") or {}
    return {"head_acc": det["head"]["acc"], "head_f1": det["head"]["f1"], "head_auroc": det["head"]["auroc"],
            "text_acc": det.get("text", {}).get("acc"), "text_f1": det.get("text", {}).get("f1"),
            "rouge_l": det.get("rouge_l"), "css": det.get("css"), "n_images": det["n"],
            "fid": fid.get("fid"), "kid": fid.get("kid_mean"),
            "fid_note": fid.get("not_computed") and "n/a (no Inception weights)",
            "pixel_fd32": pixel_fd(corpus, eval_dir, gen.get("n", 0)), "gen_p_fake": gen.get("p_fake_mean"),
            "n_generated": gen.get("n")}


#####################################################################################################
# the CNN baseline (CNNSpot-style: a ResNet trained from scratch as a binary real/fake classifier)
#####################################################################################################


def _cnn_tensor(img):
    import torch

    img = img.convert("RGB")
    left, top = (img.width - CNN_PX) // 2, (img.height - CNN_PX) // 2
    x = torch.from_numpy(np.asarray(img.crop((left, top, left + CNN_PX, top + CNN_PX)), dtype=np.float32).copy())
    return (x.permute(2, 0, 1) / 127.5) - 1.0  # (3, H, W) in [-1, 1]


def _cnn_split(corpus: Path, split: str, limit: int | None = None):
    """(x, y, ids) of a detection split; y = 1 for fake (the positive class), as the protocol scores it."""
    import torch

    from unigendet.inputs.images import open_image
    from unigendet.inputs.skips import SkipCounter

    recs = json.loads((corpus / "detection" / f"{split}.json").read_text())[:limit]
    xs, ys, ids, skips = [], [], [], SkipCounter()
    for i, rec in enumerate(recs):
        img = open_image(rec["image"], skips, f"{split}.json:{i}", root=corpus / "detection")
        if img is not None:
            xs.append(_cnn_tensor(img))
            ys.append(int(rec["label"] == 0))
            ids.append(i)
    return torch.stack(xs), torch.tensor(ys), ids


def cnn_arm(corpus: Path, root: Path, steps: int, seed: int, batch: int, eval_images: int) -> dict:
    import timm
    import torch
    from torchmetrics.functional.classification import binary_auroc, multiclass_f1_score

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x, y, _ = _cnn_split(corpus, "train")
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(x), generator=g), 0
    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        if pos + batch > len(order):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos: pos + batch]
        pos += batch
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    xt, yt, ids = _cnn_split(corpus, "test", eval_images)
    model.eval()
    with torch.no_grad():
        p_fake = torch.cat([model(xt[i: i + 64]).softmax(-1)[:, 1] for i in range(0, len(xt), 64)])
    pred = (p_fake >= 0.5).long()
    with open(root / "predictions.jsonl", "w") as f:
        for i, p, t in zip(ids, p_fake.tolist(), yt.tolist(), strict=True):
            f.write(json.dumps({"index": i, "p_fake": p, "pred": "fake" if p >= 0.5 else "real",
                                "label": "fake" if t else "real"}) + "\n")
    return {"head_acc": float((pred == yt).float().mean()),
            "head_f1": float(multiclass_f1_score(pred, yt, num_classes=2, average="macro")),
            "head_auroc": float(binary_auroc(p_fake, yt)) if 0 < int(yt.sum()) < len(yt) else float("nan"),
            "n_images": len(yt), "train_loss_last": float(loss.detach()), "train_seconds": round(train_s, 1),
            "batch": batch, "px": CNN_PX, "predictions": str(root / "predictions.jsonl")}


#####################################################################################################
# arms, table
#####################################################################################################


def run_arm(arm: str, seed: int, corpus: Path, work: Path, steps: int, ev: dict, args) -> dict:
    root = work / f"seed{seed}" / arm
    t0 = time.perf_counter()
    if arm == "cnn":
        metrics = cnn_arm(corpus, root, steps, seed, args.cnn_batch, ev["images"])
        train = f"{steps} AdamW steps x {args.cnn_batch} images"
    else:
        init = None
        if arm in ("gduf_diga", "gen_no_diga"):  # serial: the shared GDUF half, exported once per seed
            half = work / f"seed{seed}" / "gduf_half"
            if not (half / "exported").exists():
                fit("gduf", "gduf", corpus, half, steps - steps // 2, seed, None)
                export(half / "ckpt" / "last.ckpt", half / "export")
                (half / "exported").touch()
            init = half / "export"
            stage_steps = steps // 2
            train = f"GDUF {steps - steps // 2} steps, then {stage_steps} from its export (--model.init_from)"
        else:
            stage_steps, train = steps, f"{steps} steps"
        fit(arm, arm, corpus, root, stage_steps, seed, init)
        results = test(arm, corpus, root, stage_steps, seed, ev)
        metrics = model_row(results, corpus, root / "eval")
    return {"arm": arm, "seed": seed, "steps": steps, "training": train, **metrics,
            "wall_s": round(time.perf_counter() - t0, 1)}


TABLE_COLUMNS = (("head_acc", "head Acc"), ("head_f1", "head F1"), ("head_auroc", "AUROC"), ("text_acc", "text Acc"),
                 ("text_f1", "text F1"), ("rouge_l", "ROUGE-L"), ("css", "CSS"), ("fid", "FID"),
                 ("pixel_fd32", "pixel FD (32 px)"), ("gen_p_fake", "p(fake) on generated"), ("wall_s", "wall s"))


def mean_std(values: list) -> tuple[float, float, int] | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


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
                digits = 1 if key in ("wall_s", "fid", "pixel_fd32") else 3
                cells.append(f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}")
        seeds = ",".join(str(r["seed"]) for r in sub)
        lines.append(f"| {arm} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per arm (serial arms: split in halves)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--work", default="repro-run", help="corpus and runs")
    ap.add_argument("--out", default="repro-run/out", help="results.jsonl and table.md")
    ap.add_argument("--eval-images", type=int, default=64, help="first N detection test records (all arms)")
    ap.add_argument("--eval-prompts", type=int, default=32, help="first N text-to-image test captions")
    ap.add_argument("--gen-px", type=int, default=64)
    ap.add_argument("--gen-steps", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--cnn-batch", type=int, default=8, help="~ the detection images in one 2,048-token pack")
    ap.add_argument("--corpus-seed", type=int, default=0)
    ap.add_argument("--small-corpus", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 2 steps, tiny evaluation, small corpus (tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.small_corpus = args.seeds[:1], 2, True
        args.eval_images, args.eval_prompts, args.gen_px, args.gen_steps, args.max_new_tokens = 6, 3, 32, 2, 4
    from unigendet.demo.runner import build_corpus

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(work, args.corpus_seed, args.small_corpus)
    ev = {"images": args.eval_images, "prompts": args.eval_prompts, "px": args.gen_px, "gen_steps": args.gen_steps,
          "max_new_tokens": args.max_new_tokens}
    rows = []
    t0 = time.perf_counter()
    with open(out / "results.jsonl", "w") as f:
        for seed in args.seeds:
            for arm in args.arms:
                row = run_arm(arm, seed, corpus, work, args.steps, ev, args)
                rows.append(row)
                line = json.dumps(row)
                print(line, flush=True)
                f.write(line + "\n")
                f.flush()
    md = (f"{args.steps} optimizer steps per arm, seeds {' '.join(map(str, args.seeds))}, mean ± std (n-1) over "
          f"seeds; detection on the first {args.eval_images} test images, generation of {args.eval_prompts} test "
          f"captions at {args.gen_px} px, {args.gen_steps} steps; total {time.perf_counter() - t0:.0f} s.\n\n"
          + table(rows))
    (out / "table.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
