"""The paper's claims at the demo's working point: SMSA, DIGA and co-evolution, over seeds, with a CNN baseline (CPU).

Every arm is experiments/demo.yaml (the ``demo`` preset, its optimiser, EMA, loss weights, token budgets, the learned
autoencoder) trained by a real ``python -m unigendet fit`` subprocess for ``--steps`` optimizer steps; the arms differ
only in what the method changes (``model.stage.*``, ``data.with_vae``, ``data.gen.teacher``, ARM_ARGS below):

* ``gduf``          - GDUF: one joint update of all parameters per step, detection samples WITH the VAE split (SMSA);
* ``gduf_no_smsa``  - the same without the VAE split;
* ``gduf_diga``     - serial: GDUF for steps/2, exported (``unigendet export``), then steps/2 of DIGA (detector frozen,
                      its snapshot the teacher) from the export (``--model.init_from``);
* ``gen_no_diga``   - serial: the same GDUF half, then steps/2 of generation-only training (detector frozen, no DIGA);
* ``coevolve``      - co-evolution: a detection and a generation update every step, DIGA against a snapshot
                      refreshed every 100 steps, 4 fresh fakes from the current generator every 50 steps
                      (experiments/coevolve.yaml's cadences);
* ``cnn``           - a timm ResNet-18 trained from scratch (CNNSpot-style binary classifier, AdamW) on the same
                      detection training images for the same wall time as this seed's ``gduf`` fit.

Every model arm is scored the same way (``evaluate_model``): the head on every detection test image; explanations for a
label-balanced panel (ROUGE-L, verdict accuracy); ``--fd-prompts`` held-out captions generated at 32 px, their
Fréchet distance to the held-out real images in the features of a network trained here on the corpus' real images
(``unigendet.demo.feature_net``, ``feat_fd``), the hand-made ``fd_features`` distance of ``make demo`` (``demo_fd``),
FID and KID when ``UNIGENDET_INCEPTION_WEIGHTS`` names the Inception file, and the arm's own detector's mean p(fake)
on its generated images. Validation every 250 steps and the training losses go to a CSV log per run (the curves).

One JSON line per (arm, seed) goes to stdout and ``OUT/results.jsonl``. A rerun with the same OUT resumes: rows already
there are kept (their settings must match) and only missing (arm, seed) pairs run. ``bench/reproduce_report.py`` turns
the rows into the table, the paired differences with their verdicts and the learning-curve PNG.

    python bench/reproduce.py --work repro-run --out repro-run/out     # 6 arms x 3 seeds, ~3.5 h on 2 cores
    python bench/reproduce_report.py --out repro-run/out               # table.md, claims.md, curves.png
    python bench/reproduce.py --smoke --arms gduf cnn --work /tmp/w --out /tmp/o
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "experiments" / "demo.yaml"
ARMS = ("gduf", "gduf_no_smsa", "gduf_diga", "gen_no_diga", "coevolve", "cnn")
SERIAL = ("gduf_diga", "gen_no_diga")
_DIGA = ["--model.stage.diga=true", "--model.stage.diga_layer=2", "--data.gen.teacher=true"]  # demo preset: 4 layers
ARM_ARGS = {
    "gduf": ["--model.stage.joint=true", "--data.with_vae=true"],
    "gduf_no_smsa": ["--model.stage.joint=true", "--data.with_vae=false"],
    "gduf_diga": ["--model.stage.train_det=false", *_DIGA, "--model.stage.teacher=frozen"],
    "gen_no_diga": ["--model.stage.train_det=false", "--model.stage.diga=false"],
    "coevolve": [*_DIGA, "--model.stage.teacher=snapshot", "--model.stage.teacher_refresh=100",
                 "--model.stage.fresh_fakes_every=50", "--model.stage.fresh_fakes=4", "--model.stage.fresh_fake_px=48",
                 "--model.stage.fresh_fake_steps=10"],
}
CNN_PX = 32  # the CNN sees a centre crop of this size (every corpus image is >= 32 px per side): no resampling
FD_PX = 32  # generated side for the Fréchet distances (the corpus' smallest side)


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


def fit_args(arm: str, corpus: Path, ae: Path, root: Path, steps: int, seed: int, val_every: int,
             init_from: Path | None) -> list[str]:
    """The ``unigendet fit`` command line of one training run: demo.yaml, then this run's paths, seed and length, then
    the arm's stage."""
    trainer_cfg = root / "trainer.yaml"  # a later config's list replaces demo.yaml's callbacks
    trainer_cfg.write_text(json.dumps({"trainer": {
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                   "init_args": {"save_dir": str(root), "name": "csv", "version": 0}},
        "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                       "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": 0,
                                     "monitor": None}}]}}))
    det, t2i = corpus / "detection", corpus / "t2i"
    return [sys.executable, "-m", "unigendet", "fit", f"--config={DEMO_YAML}", f"--config={trainer_cfg}",
            f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={val_every}", "--trainer.enable_progress_bar=false",
            # the seed must reach the model (init, noise) and the data (order): seed_everything alone reaches neither
            f"--seed_everything={seed}", f"--model.seed={seed}", f"--data.seed={seed}",
            f"--model.init_ae_from={ae}", f"--model.init_from={init_from or 'null'}",
            f"--data.train={det / 'train.json'}", f"--data.val={det / 'val.json'}",
            f"--data.tokenizer={corpus / 'tokenizer.json'}", f"--data.gen.train={t2i / 'train.jsonl'}",
            f"--data.gen.val={t2i / 'val.jsonl'}", *ARM_ARGS[arm]]


def fit(arm: str, corpus: Path, ae: Path, root: Path, steps: int, seed: int, val_every: int,
        init_from: Path | None = None) -> float:
    """Train one run (``root/ckpt/last.ckpt``, ``root/csv/version_0/metrics.csv``); returns its wall seconds. A run
    whose ``root/done`` exists is not trained again (resume); one cut off part-way is trained again from the start."""
    done = root / "done"
    if done.exists():
        return float(json.loads(done.read_text())["seconds"])
    if root.exists():  # a run cut off part-way: its checkpoints and logs would mix with the new ones
        shutil.rmtree(root)
    root.mkdir(parents=True)
    seconds = _sh(fit_args(arm, corpus, ae, root, steps, seed, val_every, init_from), root / "fit.log")
    done.write_text(json.dumps({"seconds": seconds}))
    return seconds


def export(ckpt: Path, out: Path) -> None:
    marker = out.parent / "exported"
    if not marker.exists():
        _sh([sys.executable, "-m", "unigendet", "export", "--ckpt", str(ckpt), "--out", str(out), "--no-progress"],
            out.parent / "export.log")
        marker.touch()


#####################################################################################################
# scoring a trained model
#####################################################################################################


class Reference:
    """What every arm is scored against, built once per work folder: the held-out real images, their features in the
    feature network (trained here on the real training images, kept in ``work/feature_net.safetensors``) and in
    ``fd_features``, and the prompts."""

    def __init__(self, corpus: Path, work: Path, n_prompts: int) -> None:
        from unigendet.demo import feature_net as fn
        from unigendet.demo.metrics import fd_features, frechet_distance
        from unigendet.inputs.records import open_t2i_images
        from unigendet.inputs.skips import SkipCounter

        path = work / "feature_net.safetensors"
        if path.exists():
            self.net, self.net_report = fn.load_feature_net(path)
        else:
            self.net, self.net_report = fn.train_feature_net(corpus, seed=0)
            fn.save_feature_net(self.net, self.net_report, path)
        test = open_t2i_images(corpus / "t2i" / "test.jsonl", SkipCounter())
        val = open_t2i_images(corpus / "t2i" / "val.jsonl", SkipCounter())
        self.real = [img for _, img in test]
        self.prompts = [p for p, _ in test[:n_prompts]]
        self.feat = fn.features(self.net, self.real)
        self.demo_feat = fd_features(self.real)
        # the floor: as many held-out real images of the val split as there are generated ones, against test
        floor = [img for _, img in val[:n_prompts]]
        self.floor = {"feat_fd": frechet_distance(fn.features(self.net, floor), self.feat),
                      "demo_fd": frechet_distance(fd_features(floor), self.demo_feat)}

    def scores(self, images: list) -> dict:
        from unigendet.demo import feature_net as fn
        from unigendet.demo.metrics import fd_features, frechet_distance

        return {"feat_fd": frechet_distance(fn.features(self.net, images), self.feat),
                "demo_fd": frechet_distance(fd_features(images), self.demo_feat)}


def inception_scores(real: list, fake: list) -> dict:
    """FID / KID when ``UNIGENDET_INCEPTION_WEIGHTS`` names the Inception file, else a note."""
    weights = os.environ.get("UNIGENDET_INCEPTION_WEIGHTS")
    if not weights:
        return {"fid": None, "kid": None, "fid_note": "n/a (UNIGENDET_INCEPTION_WEIGHTS not set)"}
    from unigendet.evaluation.fidelity import fidelity_metrics

    m = fidelity_metrics(real, fake, weights, isc=False, kid_subset_size=min(len(real), len(fake)))
    return {"fid": m["fid"], "kid": m["kid_mean"], "fid_note": None}


def evaluate_model(ckpt: Path, corpus: Path, out: Path, ref: Reference, seed: int, panel: int, gen_steps: int,
                   with_vae: bool) -> dict:
    """The demo's held-out evaluation (``unigendet.demo.runner.evaluate``: the head on every test image, explanations
    for a balanced panel), detection samples with the VAE split as the arm trained, plus generation scores for the
    reference prompts."""
    from unigendet.demo.runner import evaluate

    metrics, pipe = evaluate(ckpt, corpus, out, panel, seed, with_vae=with_vae)
    images = pipe.generate(ref.prompts, height=FD_PX, width=FD_PX, steps=gen_steps, seed=seed)
    p_fake = [d.p_fake for i in range(0, len(images), 16)
              for d in pipe.detect(images[i: i + 16], explain=False, with_vae=with_vae)]
    (out / "generated").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images[:16]):
        img.save(out / "generated" / f"{i:03d}.png")
    return {"head_acc": metrics["heldout_acc"], "head_f1": metrics["heldout_f1"],
            "head_auroc": metrics["heldout_auroc"], "per_family": metrics["per_family"],
            "rouge_l": metrics["heldout_rouge_l"], "verdict_acc": metrics["verdict_acc"],
            "n_images": metrics["heldout_images"], "n_explained": metrics["explained"],
            **ref.scores(images), **inception_scores(ref.real, images),
            "gen_p_fake": float(np.mean(p_fake)), "gen_judged_fake": float(np.mean([p >= 0.5 for p in p_fake])),
            "n_generated": len(images)}


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
    """(x, y, ids, families) of a detection split; y = 1 for fake (the positive class), as the protocol scores it."""
    import torch

    from unigendet.inputs.images import open_image
    from unigendet.inputs.skips import SkipCounter

    recs = json.loads((corpus / "detection" / f"{split}.json").read_text())[:limit]
    xs, ys, ids, fams, skips = [], [], [], [], SkipCounter()
    for i, rec in enumerate(recs):
        img = open_image(rec["image"], skips, f"{split}.json:{i}", root=corpus / "detection")
        if img is not None:
            xs.append(_cnn_tensor(img))
            ys.append(int(rec["label"] == 0))
            ids.append(i)
            fams.append(str(rec.get("cate", "real" if rec["label"] == 1 else "fake")))
    if skips.counts:
        print(f"[reproduce] cnn: skipped {split} records: {dict(skips.counts)}", file=sys.stderr)
    return torch.stack(xs), torch.tensor(ys), ids, fams


def cnn_arm(corpus: Path, root: Path, seconds: float, seed: int, batch: int) -> dict:
    """Train for ``seconds`` of wall time (the learning rate decays on a cosine of the elapsed fraction), then score
    every detection test image with the protocol's summary (``detection_summary``)."""
    import timm
    import torch

    from unigendet.evaluation.scores import detection_summary

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    x, y, _, _ = _cnn_split(corpus, "train")
    model = timm.create_model("resnet18", pretrained=False, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    order, pos, steps = torch.randperm(len(x), generator=g), 0, 0
    t0 = time.perf_counter()
    model.train()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + math.cos(math.pi * elapsed / seconds))
        if pos + batch > len(order):
            order, pos = torch.randperm(len(x), generator=g), 0
        idx = order[pos: pos + batch]
        pos += batch
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
    train_s = time.perf_counter() - t0
    xt, yt, ids, fams = _cnn_split(corpus, "test")
    model.eval()
    with torch.no_grad():
        p_fake = torch.cat([model(xt[i: i + 64]).softmax(-1)[:, 1] for i in range(0, len(xt), 64)])
    with open(root / "predictions.jsonl", "w") as f:
        for i, p, t in zip(ids, p_fake.tolist(), yt.tolist(), strict=True):
            f.write(json.dumps({"index": i, "p_fake": p, "pred": "fake" if p >= 0.5 else "real",
                                "label": "fake" if t else "real"}) + "\n")
    # detection_summary takes the corpus' labels (0 = fake, 1 = real)
    head = detection_summary(p_fake, 1 - yt, fams)
    return {"head_acc": head["acc"], "head_f1": head["f1"],
            "head_auroc": None if math.isnan(head["auroc"]) else head["auroc"],
            "per_family": {k: m["acc"] for k, m in head["per_category"].items()}, "n_images": len(yt),
            "train_loss_last": float(loss.detach()), "train_seconds": round(train_s, 1), "cnn_steps": steps,
            "batch": batch, "px": CNN_PX, "predictions": str(root / "predictions.jsonl")}


#####################################################################################################
# arms
#####################################################################################################


def run_arm(arm: str, seed: int, ctx: dict, args) -> dict:
    seed_dir = ctx["work"] / f"seed{seed}"
    root = seed_dir / arm
    t0 = time.perf_counter()
    if arm == "cnn":
        budget = ctx["gduf_seconds"].get(seed) or args.cnn_seconds
        saved, key = root / "row.json", {"budget": budget, "batch": args.cnn_batch}
        kept = json.loads(saved.read_text()) if saved.exists() else None
        if kept is not None and kept["key"] == key:  # trained already: its scores stand
            return kept["row"]
        metrics = cnn_arm(ctx["corpus"], root, budget, seed, args.cnn_batch)
        row = {"arm": arm, "seed": seed, "training": f"{metrics['cnn_steps']} AdamW steps x {args.cnn_batch} images "
               f"in {budget:.0f} s (this seed's gduf fit)", **metrics, "fit_s": metrics["train_seconds"],
               "wall_s": round(time.perf_counter() - t0, 1)}
        saved.write_text(json.dumps({"key": key, "row": row}))
        return row
    steps, common = args.steps, (ctx["corpus"], ctx["ae"])
    fit_s, init, curves = 0.0, None, []
    if arm in SERIAL:  # the shared GDUF half, exported once per seed
        half = seed_dir / "gduf_half"
        fit_s += fit("gduf", *common, half, steps - steps // 2, seed, args.val_every)
        export(half / "ckpt" / "last.ckpt", half / "export")
        init, curves = half / "export", [str(half / "csv" / "version_0" / "metrics.csv")]
        steps = steps // 2
        training = f"GDUF {args.steps - steps} steps, then {steps} from its export"
    else:
        training = f"{steps} steps"
    fit_s += fit(arm, *common, root, steps, seed, args.val_every, init)
    curves.append(str(root / "csv" / "version_0" / "metrics.csv"))
    metrics = evaluate_model(root / "ckpt" / "last.ckpt", ctx["corpus"], root / "eval", ctx["ref"], seed,
                             args.panel, args.gen_steps, with_vae=arm != "gduf_no_smsa")
    return {"arm": arm, "seed": seed, "training": training, **metrics, "fit_s": round(fit_s, 1), "curves": curves,
            "wall_s": round(time.perf_counter() - t0, 1)}


SETTINGS = ("steps", "val_every", "panel", "fd_prompts", "gen_steps", "cnn_batch", "corpus_seed", "small_corpus")


def read_rows(path: Path, settings: dict) -> list[dict]:
    """The rows of an earlier (partial) run; refuses rows made with other settings."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for row in rows:
        if row.get("settings") != settings:
            raise SystemExit(f"{path} holds rows made with other settings ({row.get('settings')}, now {settings}): "
                             "give another --out, or the same settings")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="optimizer steps per arm (serial arms: split in halves)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    ap.add_argument("--work", default="repro-run", help="corpus, autoencoder, feature network and runs")
    ap.add_argument("--out", default="repro-run/out", help="results.jsonl")
    ap.add_argument("--val-every", type=int, default=250)
    ap.add_argument("--panel", type=int, default=32, help="held-out images whose explanation is decoded")
    ap.add_argument("--fd-prompts", type=int, default=400, help="held-out captions generated for the distances "
                    "(the corpus has 400; fewer leave the distances noisier)")
    ap.add_argument("--gen-steps", type=int, default=25)
    ap.add_argument("--cnn-batch", type=int, default=32)
    ap.add_argument("--cnn-seconds", type=float, default=500.0, help="CNN budget when this seed has no gduf row")
    ap.add_argument("--corpus-seed", type=int, default=0)
    ap.add_argument("--small-corpus", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="1 seed, 4 steps, tiny scoring, small corpus (tests)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seeds, args.steps, args.small_corpus, args.val_every = args.seeds[:1], 4, True, 2
        args.panel, args.fd_prompts, args.gen_steps, args.cnn_seconds = 4, 6, 2, 5.0
    from unigendet.demo.runner import build_autoencoder, build_corpus

    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: getattr(args, k) for k in SETTINGS}
    rows = read_rows(out / "results.jsonl", settings)
    done = {(r["arm"], r["seed"]) for r in rows}
    corpus = build_corpus(work, args.corpus_seed, args.small_corpus)
    ctx = {"work": work, "corpus": corpus, "ae": build_autoencoder(work, corpus, args.corpus_seed),
           "ref": Reference(corpus, work, args.fd_prompts),
           "gduf_seconds": {r["seed"]: r["fit_s"] for r in rows if r["arm"] == "gduf"}}
    (out / "reference.json").write_text(json.dumps({"feature_net": ctx["ref"].net_report, "floor": ctx["ref"].floor,
                                                    "settings": settings}, indent=1))
    with open(out / "results.jsonl", "a") as f:
        for seed in args.seeds:
            for arm in args.arms:
                if (arm, seed) in done:
                    continue
                row = {**run_arm(arm, seed, ctx, args), "settings": settings}
                if arm == "gduf":
                    ctx["gduf_seconds"][seed] = row["fit_s"]
                line = json.dumps(row)
                print(line, flush=True)
                f.write(line + "\n")
                f.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
