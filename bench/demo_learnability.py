"""How learnable is the demo corpus on this machine? Dedicated classifiers, trained from scratch, as a ceiling for
what the full model can reach in the demo's time.

    python bench/demo_learnability.py --corpus demo-run/corpus --model cnn --steps 1500
    python bench/demo_learnability.py --corpus demo-run/corpus --model vit --steps 1500

* ``cnn``: 4 conv layers (32/32/64/64 channels, one stride 2), global average pool, linear; random 32x32 crops,
  batches of 64 (the cheapest detector that sees local traces);
* ``vit``: the ``demo`` preset's own ViT (3 layers, width 96, patch 4, fan-in init) on whole images through the real
  DetectionDataModule (packed, token budget 2048, no VAE split, labels balanced), pooled over each image's tokens
  (``--pool mean``, ``max``, or ``attn``: a learned 4-head attention pooling) into a LayerNorm + linear head: the full
  model's image encoder without the decoder in between. ``--families real,gan_upsample`` keeps only those ``cate``.

Prints held-out (val) accuracy, overall and per family, every ``--every`` steps, with the wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn


def per_family(ok: list[bool], cates: list[str]) -> dict[str, float]:
    out: dict[str, list[bool]] = {}
    for o, c in zip(ok, cates, strict=True):
        out.setdefault(c, []).append(o)
    return {c: round(sum(v) / len(v), 3) for c, v in sorted(out.items())}


def report(step: int, t0: float, ok: list[bool], cates: list[str]) -> None:
    print(json.dumps({"step": step, "seconds": round(time.time() - t0, 1), "val_acc": round(sum(ok) / len(ok), 3),
                      "per_family": per_family(ok, cates)}), flush=True)


def run_cnn(corpus: Path, steps: int, every: int, crop: int = 32, batch: int = 64) -> None:
    def load(split: str):
        recs = json.loads((corpus / "detection" / f"{split}.json").read_text())
        xs = [np.asarray(Image.open(corpus / "detection" / r["image"]).convert("RGB"), np.float32) / 127.5 - 1
              for r in recs]
        return xs, torch.tensor([r["label"] for r in recs]), [r["cate"] for r in recs]

    x_tr, y_tr, _ = load("train")
    x_va, y_va, c_va = load("val")
    rng = np.random.default_rng(0)

    def random_crop(x: np.ndarray) -> torch.Tensor:
        i, j = rng.integers(0, x.shape[0] - crop + 1), rng.integers(0, x.shape[1] - crop + 1)
        return torch.from_numpy(x[i:i + crop, j:j + crop]).permute(2, 0, 1)

    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = rng.integers(0, len(x_tr), batch)
        loss = F.cross_entropy(net(torch.stack([random_crop(x_tr[i]) for i in idx])), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            with torch.no_grad():
                pred = [int(net(torch.from_numpy(x).permute(2, 0, 1)[None]).argmax()) for x in x_va]
            report(step, t0, [p == int(y) for p, y in zip(pred, y_va, strict=True)], c_va)


def run_vit(corpus: Path, steps: int, every: int, lr: float = 1e-3, pool: str = "mean",
            families: list[str] | None = None) -> None:
    from data_modules.detection import DetectionDataModule
    from unigendet.model.config import UniGenDetConfig
    from unigendet.model.unigendet import UniGenDet

    cfg = UniGenDetConfig.from_name("demo")
    model = UniGenDet(cfg)
    model.init_weights()
    det = corpus / "detection"
    dm = DetectionDataModule(train=str(det / "train.json"), val=str(det / "val.json"),
                             tokenizer=str(corpus / "tokenizer.json"), token_budget=2048, num_workers=1,
                             with_vae=False, categories=families, balance_labels=True).connect(cfg)
    dm.setup("fit")
    val_recs = json.loads((det / "val.json").read_text())
    head = nn.Sequential(nn.LayerNorm(cfg.vit.dim), nn.Linear(cfg.vit.dim, 2))
    scores = nn.Linear(cfg.vit.dim, 4)  # attention pooling: 4 heads of dim/4 features each
    params = [*model.vit.parameters(), *head.parameters(), *scores.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def pooled(f: torch.Tensor) -> torch.Tensor:  # (n_tokens, dim) -> (dim,)
        if pool == "max":
            return f.max(0).values
        if pool == "attn":
            w = scores(f).softmax(0)  # (n, 4)
            return (w.repeat_interleave(f.shape[-1] // 4, dim=1) * f).sum(0)
        return f.mean(0)

    def logits(b):
        feats = model.vit(b.vit_tokens, b.vit_position_ids, b.vit_seqlens, backend="sdpa")
        return head(torch.stack([pooled(f) for f in feats.split(b.vit_seqlens.tolist())]))

    def batches():
        while True:
            yield from dm.train_dataloader()

    t0 = time.time()
    for step, b in zip(range(1, steps + 1), batches(), strict=False):
        loss = F.cross_entropy(logits(b), b.det_labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            ok, cates = [], []
            with torch.no_grad():
                for vb in dm.val_dataloader():
                    ok += (logits(vb).argmax(-1) == vb.det_labels).tolist()
                    cates += [val_recs[int(str(s).rsplit(":", 1)[1])]["cate"] for s in vb.sample_ids]
            report(step, t0, ok, cates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--corpus", type=Path, default=Path("demo-run/corpus"))
    p.add_argument("--model", choices=["cnn", "vit"], default="cnn")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3, help="vit only")
    p.add_argument("--pool", choices=["mean", "max", "attn"], default="mean", help="vit only")
    p.add_argument("--families", help="vit only: comma-separated cate values to keep, e.g. real,gan_upsample")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    if args.model == "cnn":
        run_cnn(args.corpus, args.steps, args.every)
    else:
        run_vit(args.corpus, args.steps, args.every, lr=args.lr, pool=args.pool,
                families=args.families.split(",") if args.families else None)


if __name__ == "__main__":
    main()
