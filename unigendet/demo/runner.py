"""``make demo`` / ``unigendet demo``: the embedded default, end to end on CPU.

1. builds the embedded corpus (``demo-run/corpus``) and trains the demo preset's small autoencoder on its real
   images (``demo-run/ae.safetensors``, ``unigendet train-ae``), unless they are already there;
2. trains the ``demo`` preset with ``experiments/demo.yaml`` (co-evolution: a detection update every step and a
   generation update every second step), logging to a W&B offline run under ``demo-run/wandb``;
3. evaluates the last checkpoint's EMA weights on the held-out test split: detection accuracy / macro-F1 from the
   head over every test image, explanations (KV-cache decoding) for a panel of images with ROUGE-L against the
   reference explanations, a few of them printed next to their references;
4. generates a grid of images for held-out captions (``demo-run/samples/grid.png``), and 32-px samples for the first
   64 held-out captions from the trained model and from the same network untrained (its initial weights, rebuilt from
   the seed): their Frechet distance to the held-out real images (``unigendet.demo.metrics.fd_features``) is
   ``fd_after`` and ``fd_before``;
5. prints, as its LAST stdout line, one JSON summary: heldout_acc, heldout_f1, heldout_auroc, per_family (head
   accuracy per family), heldout_rouge_l, verdict_acc / verdict_agreement (the explanation's first "real"/"fake" against
   the label / the head), no_verdict, block_ratio (token-block pattern of the samples, ~1 when absent), fd_before /
   fd_after, train_seconds, checkpoint, samples (and where the W&B run is).

This module orchestrates the application (corpus builder, DataModule, trainer); it imports ``data_modules`` only
inside functions, like the CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def build_corpus(out: Path, seed: int, small: bool = False) -> Path:
    corpus = out / "corpus"
    if (corpus / "manifest.json").exists():
        print(f"[demo] corpus already built: {corpus}", file=sys.stderr)
        return corpus
    from unigendet.demo.corpus import FULL, SMALL, build_demo_corpus

    t0 = time.perf_counter()
    build_demo_corpus(corpus, seed=seed, **(SMALL if small else FULL))
    print(f"[demo] built the corpus in {time.perf_counter() - t0:.0f} s: {corpus}", file=sys.stderr)
    return corpus


def build_autoencoder(out: Path, corpus: Path, seed: int) -> Path:
    path = out / "ae.safetensors"
    if path.exists():
        print(f"[demo] autoencoder already trained: {path}", file=sys.stderr)
        return path
    from unigendet.training.autoencoder import train_from_corpus

    report = train_from_corpus(corpus, path, seed=seed)
    print(f"[demo] trained the autoencoder in {report['seconds']:.0f} s (held-out PSNR {report['heldout_psnr']:.1f} "
          f"dB): {path}", file=sys.stderr)
    return path


def train(out: Path, corpus: Path, config: Path, extra: list[str]) -> tuple[Path, float, str | None]:
    from unigendet.lightning_cli import UniGenDetCLI

    os.environ.setdefault("WANDB_MODE", "offline")
    args = [f"--config={config}", f"--trainer.default_root_dir={out}", f"--trainer.logger.init_args.save_dir={out}",
            f"--data.train={corpus}/detection/train.json", f"--data.val={corpus}/detection/val.json",
            f"--data.tokenizer={corpus}/tokenizer.json", f"--data.gen.train={corpus}/t2i/train.jsonl",
            f"--data.gen.val={corpus}/t2i/val.jsonl", *extra]
    cli = UniGenDetCLI(args=args, run=False)
    t0 = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - t0
    callback = cli.trainer.checkpoint_callback
    ckpt = Path(callback.last_model_path) if callback is not None and callback.last_model_path else None
    if ckpt is None or not ckpt.exists():
        ckpt = out / "checkpoints" / "last.ckpt"
    # the final weights: ModelCheckpoint(every_n_train_steps=N) leaves last.ckpt at the last multiple of N when
    # max_steps is not one (e.g. --trainer.max_steps=300 with the demo's N=250 would score step 250)
    if ckpt.is_symlink():  # save_last="link": write the final state beside the step checkpoint it points to
        ckpt.unlink()
    cli.trainer.save_checkpoint(ckpt, weights_only=False)  # the full training state, as ModelCheckpoint writes it
    wandb_dir = None
    logger = cli.trainer.logger
    if logger is not None and hasattr(logger, "experiment") and hasattr(logger.experiment, "dir"):
        wandb_dir = str(Path(logger.experiment.dir).parent)
        logger.experiment.finish()
    return ckpt, seconds, wandb_dir


def evaluate(ckpt: Path, corpus: Path, out: Path, panel: int, seed: int, with_vae: bool = True) -> tuple[dict, object]:
    """Held-out detection (the head on every test image), explanations for a label-balanced ``panel`` (ROUGE-L,
    verdicts); ``with_vae``: detection samples with the clean VAE split, as the run was trained (SMSA)."""
    import math

    import torch
    from torchmetrics.text import ROUGEScore

    from unigendet.demo.metrics import verdict_scores
    from unigendet.evaluation.scores import detection_summary
    from unigendet.inference import UniGenDetPipeline
    from unigendet.inputs.images import open_image
    from unigendet.inputs.skips import SkipCounter

    pipe = UniGenDetPipeline.from_pretrained(ckpt)
    records = json.loads((corpus / "detection" / "test.json").read_text())
    skips = SkipCounter()
    images, labels, refs, families = [], [], [], []
    for i, rec in enumerate(records):
        img = open_image(rec["image"], skips, f"test.json:{i}", root=corpus / "detection")
        if img is not None:
            images.append(img)
            labels.append(rec["label"])
            refs.append(rec["conversations"][1]["value"])
            families.append(str(rec.get("cate", "real" if rec["label"] == 1 else "fake")))
    p_fake = []
    for i in range(0, len(images), 16):
        p_fake += [r.p_fake for r in pipe.detect(images[i: i + 16], explain=False, with_vae=with_vae)]
    # the metrics' one definition (val/, test/, the callbacks); AUROC is null when the split holds one class only
    head = detection_summary(torch.tensor(p_fake), torch.tensor(labels), families)
    # explanations for a fixed, label-balanced panel
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g).tolist()
    chosen = [i for i in order if labels[i] == 0][: panel // 2] + [i for i in order if labels[i] == 1][: panel // 2]
    explained = []
    for i in range(0, len(chosen), 8):
        explained += pipe.detect([images[j] for j in chosen[i: i + 8]], max_new_tokens=160, with_vae=with_vae)
    rouge = ROUGEScore(rouge_keys=("rougeL",), use_stemmer=True)  # F, stemmed: the protocol's ROUGE-L
    score = rouge([r.explanation for r in explained], [refs[j] for j in chosen])
    verdicts = verdict_scores([r.explanation for r in explained],
                              ["fake" if labels[j] == 0 else "real" for j in chosen], [r.label for r in explained])
    print("\n[demo] held-out explanations (generated | reference):", file=sys.stderr)
    for j, r in list(zip(chosen, explained, strict=True))[:4]:
        print(f"  p_fake={r.p_fake:.2f} label={'fake' if labels[j] == 0 else 'real'}\n    ours: {r.explanation[:220]}"
              f"\n    ref : {refs[j][:220]}", file=sys.stderr)
    return {"heldout_acc": round(head["acc"], 4), "heldout_f1": round(head["f1"], 4),
            "heldout_auroc": None if math.isnan(head["auroc"]) else round(head["auroc"], 4),
            "per_family": {fam: round(m["acc"], 4) for fam, m in head["per_category"].items()},
            "heldout_rouge_l": round(float(score["rougeL_fmeasure"]), 4), **verdicts, "heldout_images": len(images),
            "explained": len(explained), "skipped": dict(skips.counts)}, pipe


def sample_grid(pipe, corpus: Path, out: Path, n: int, seed: int, px: int, steps: int) -> tuple[Path, float]:
    """Images for the first ``n`` held-out captions, tiled with each caption under its image; returns the grid's
    path and the samples' mean :func:`~unigendet.demo.metrics.block_ratio` (token-block pattern, ~1 when absent)."""
    import numpy as np
    from PIL import Image

    from unigendet.demo.metrics import block_ratio
    from unigendet.evaluation.plots import caption_grid

    prompts = [json.loads(line)["prompt"] for line in (corpus / "t2i" / "test.jsonl").read_text().splitlines()[:n]]
    images = pipe.generate(prompts, height=px, width=px, steps=steps, seed=seed)
    # shown at least 128 px wide (nearest neighbour: every generated pixel stays visible as it is), so that the
    # captions under small samples stay readable
    zoom = max(1, -(-128 // px))
    shown = [im.resize((im.width * zoom, im.height * zoom), Image.NEAREST) for im in images]
    grid = caption_grid(shown, [f"{i}: {p}" for i, p in enumerate(prompts)], n_cols=min(4, len(images)))
    (out / "samples").mkdir(parents=True, exist_ok=True)
    path = out / "samples" / "grid.png"
    grid.save(path)
    (out / "samples" / "prompts.txt").write_text("\n".join(prompts) + "\n")
    block = pipe.cfg.vae_pixels_per_token
    ratio = float(np.mean([block_ratio(np.asarray(im.convert("RGB")), block) for im in images]))
    return path, ratio


def untrained_engine(pipe, ckpt: Path):
    """The network the run started from: same config, initialised like ``LitUniGenDet.configure_model`` (its seed,
    ``init_weights``), without touching the global random state."""
    import torch

    from unigendet.checkpoint.loading import safe_torch_load
    from unigendet.inference import Engine
    from unigendet.model.unigendet import UniGenDet

    seed = int(safe_torch_load(ckpt)["hyper_parameters"].get("seed", 0))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UniGenDet(pipe.cfg)
        model.init_weights()
    model.vae.load_state_dict(pipe.model.vae.state_dict())  # the frozen AE the run started with (trained first)
    return Engine(model, pipe.tok)


def frechet_before_after(pipe, ckpt: Path, corpus: Path, n: int, seed: int, steps: int) -> tuple[float, float]:
    """(fd_before, fd_after): 32-px Frechet distance of the untrained and the trained model's samples for the first
    ``n`` held-out captions against all held-out real images (the t2i test split)."""
    from unigendet.demo.metrics import FD_PX, fd_features, frechet_distance
    from unigendet.inputs.records import open_t2i_images
    from unigendet.inputs.skips import SkipCounter

    pairs = open_t2i_images(corpus / "t2i" / "test.jsonl", SkipCounter())
    real_feats = fd_features([img for _, img in pairs])
    prompts = [prompt for prompt, _ in pairs[:n]]
    out = []
    for engine in (untrained_engine(pipe, ckpt), pipe):
        images = engine.generate(prompts, height=FD_PX, width=FD_PX, steps=steps, seed=seed)
        out.append(round(frechet_distance(fd_features(images), real_feats), 3))
    return out[0], out[1]


def plain_summary(m: dict, grid: Path) -> str:
    """What the numbers say, in words (printed before the JSON line)."""
    auroc = "" if m.get("heldout_auroc") is None else f", AUROC {m['heldout_auroc']:.2f}"
    fams = ", ".join(f"{fam} {100 * acc:.0f}%" for fam, acc in m["per_family"].items())
    n = m["explained"]
    blocks = "token blocks visible" if m["block_ratio"] > 1.3 else "no token-block pattern"
    return (f"[demo] Detection: {100 * m['heldout_acc']:.0f}% of {m['heldout_images']} held-out images right{auroc} "
            f"(by family: {fams}).\n"
            f"[demo] Explanations: the verdict is right for {round(m['verdict_acc'] * n)} of {n} held-out images and "
            f"agrees with the head for {round(m['verdict_agreement'] * n)}; ROUGE-L {m['heldout_rouge_l']:.2f}.\n"
            f"[demo] Samples: {grid}, block ratio {m['block_ratio']:.2f} ({blocks}; about 1 means none); 32-px Frechet "
            f"distance to held-out real images {m['fd_after']:.2f}, {m['fd_before']:.2f} before training "
            f"({m['fd_after'] / max(m['fd_before'], 1e-9):.0%} of it; lower is better).")


def main_demo(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="unigendet demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="demo-run")
    ap.add_argument("--config", default=str(REPO_EXPERIMENTS / "demo.yaml"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="the few-second corpus (tests)")
    ap.add_argument("--panel", type=int, default=16, help="held-out images whose explanation is decoded")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--sample-px", type=int, default=48)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--fd-samples", type=int, default=64, help="held-out captions sampled for fd_before / fd_after")
    ap.add_argument("overrides", nargs="*", help="extra LightningCLI overrides, e.g. --trainer.max_steps=50")
    args, unknown = ap.parse_known_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(out, args.seed, args.small)
    ae = build_autoencoder(out, corpus, args.seed)
    ckpt, seconds, wandb_dir = train(out, corpus, Path(args.config),
                                     [f"--model.init_ae_from={ae}", *args.overrides, *unknown])
    metrics, pipe = evaluate(ckpt, corpus, out, args.panel, args.seed)
    grid, ratio = sample_grid(pipe, corpus, out, args.samples, args.seed, args.sample_px, args.sample_steps)
    fd_before, fd_after = frechet_before_after(pipe, ckpt, corpus, args.fd_samples, args.seed, args.sample_steps)
    metrics.update(block_ratio=round(ratio, 3), fd_before=fd_before, fd_after=fd_after)
    print(f"[demo] samples: {grid}; W&B offline run: {wandb_dir} (sync with `wandb sync {wandb_dir}`)",
          file=sys.stderr)
    print(plain_summary(metrics, grid), file=sys.stderr)
    print(json.dumps({**metrics, "train_seconds": round(seconds, 1),
                      "checkpoint": str(ckpt), "samples": str(grid), "wandb": wandb_dir}))
    return 0
