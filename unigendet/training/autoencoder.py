"""``unigendet train-ae``: train the demo's small autoencoder (``VAEConfig.kind == "conv"``) on a corpus's real images.

Nothing pretrained can be downloaded here, and a pixel space-to-depth "AE" leaves every generated token a hard-edged
block. So the ``demo`` preset's AE is learned once, before the model, on the text-to-image training images:

    unigendet train-ae --corpus demo-run/corpus --out demo-run/ae.safetensors

* :func:`train_autoencoder` - random crops (and mirror images) of the training images, MSE, Adam with a cosine
  decay; then the latent's per-channel mean and standard deviation are folded into the AE
  (:meth:`~unigendet.model.vae.ConvAutoencoder.fold_normalisation`), so its latents are normalised as the flow
  expects. Returns the AE and a report (steps, seconds, training MSE, held-out PSNR).
* :func:`save_autoencoder` / :func:`load_autoencoder` - a safetensors file whose keys are the AE's own (those of a
  BAGEL folder's ``ae.safetensors``), with the report in its metadata; loading checks every key and shape.
  ``LitUniGenDet(init_ae_from=...)`` loads it before the EMA, the DIGA teacher and any checkpoint restore.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from unigendet.inputs.skips import SkipCounter
from unigendet.model.config import UniGenDetConfig, VAEConfig
from unigendet.model.vae import ConvAutoencoder


def load_t2i_images(jsonl: Path) -> list[Tensor]:
    """The images of a text-to-image metadata file (``unigendet.inputs.records.open_t2i_images``) as (3, H, W) in
    [-1, 1]; skipped records are reported on stderr."""
    from unigendet.inputs.records import open_t2i_images

    skips = SkipCounter()
    out = [torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
           for _, img in open_t2i_images(jsonl, skips)]
    if skips.counts:
        print(f"[train-ae] skipped records in {jsonl}: {dict(skips.counts)}", file=sys.stderr)
    if not out:
        raise ValueError(f"{jsonl} holds no readable image")
    return out


def _crop_batch(images: list[Tensor], n: int, side: int, g: torch.Generator) -> Tensor:
    batch = []
    for i in torch.randint(len(images), (n,), generator=g).tolist():
        img = images[i]
        h, w = img.shape[-2:]
        y = int(torch.randint(h - side + 1, (1,), generator=g))
        x = int(torch.randint(w - side + 1, (1,), generator=g))
        crop = img[:, y: y + side, x: x + side]
        batch.append(crop.flip(-1) if torch.rand(1, generator=g) < 0.5 else crop)
    return torch.stack(batch)


def _aligned(img: Tensor, d: int) -> Tensor:
    h, w = img.shape[-2:]
    return img[:, : h - h % d, : w - w % d]


def train_autoencoder(cfg: VAEConfig, images: list[Tensor], *, steps: int = 600, batch: int = 32, crop: int = 32,
                      lr: float = 2e-3, seed: int = 0, held_out: list[Tensor] | None = None
                      ) -> tuple[ConvAutoencoder, dict]:
    """Train a :class:`ConvAutoencoder` on random ``crop``-pixel crops of ``images`` ((3, H, W) in [-1, 1], each
    at least ``crop`` pixels per side); returns it (frozen, normalisation folded in) and a report."""
    if cfg.kind != "conv":
        raise ValueError(f"train-ae trains the 'conv' autoencoder; this config's is {cfg.kind!r}")
    if crop % cfg.downsample or any(min(im.shape[-2:]) < crop for im in images):
        raise ValueError(f"crop ({crop}) must be a multiple of downsample ({cfg.downsample}) and fit every image")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ae = ConvAutoencoder(cfg)
    ae.init_weights()
    ae.requires_grad_(True).train()
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        x = _crop_batch(images, batch, crop, g)
        loss = F.mse_loss(ae.decode(ae.encode(x)), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    ae.requires_grad_(False).eval()
    with torch.no_grad():
        latents = torch.cat([ae.encode(_aligned(im, cfg.downsample)[None])[0].flatten(1) for im in images], dim=1)
        ae.fold_normalisation(latents.mean(1), latents.std(1).clamp_min(1e-6))
    report = {"steps": steps, "batch": batch, "crop": crop, "seconds": round(time.perf_counter() - t0, 1),
              "train_mse": round(float(np.mean(losses[-20:])), 5), "images": len(images)}
    if held_out:
        report["heldout_psnr"] = round(psnr(ae, held_out), 2)
    return ae, report


@torch.no_grad()
def psnr(ae: ConvAutoencoder, images: list[Tensor]) -> float:
    """Mean reconstruction PSNR (dB, images in [-1, 1] read as [0, 1])."""
    vals = []
    for im in images:
        x = _aligned(im, ae.downsample)[None]
        mse = float(F.mse_loss(ae.decode(ae.encode(x)).clamp(-1, 1), x)) / 4.0
        vals.append(10 * math.log10(1.0 / max(mse, 1e-10)))
    return float(np.mean(vals))


def save_autoencoder(ae: ConvAutoencoder, path: Path, report: dict) -> None:
    from safetensors.torch import save_file

    from unigendet.checkpoint.atomic import atomic_path

    # atomic: `unigendet demo` reuses an existing file, so a killed write must not leave a truncated one
    with atomic_path(path, what="autoencoder") as partial:
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(partial),
                  metadata={"unigendet_autoencoder": json.dumps(report)})


def load_autoencoder(ae: torch.nn.Module, path: str | Path) -> dict:
    """Load :func:`save_autoencoder`'s file into ``ae`` (every key, every shape); returns the training report."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no autoencoder file {path} (train one: unigendet train-ae --corpus DIR --out {path})")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
        meta = f.metadata() or {}
    own = ae.state_dict()
    wrong = sorted(set(own) ^ set(state)) + [k for k in own if k in state and own[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"{path} does not fit this model's autoencoder (keys or shapes differ: {wrong[:5]}); was it "
                         "trained for another preset?")
    ae.load_state_dict(state)
    return json.loads(meta.get("unigendet_autoencoder", "{}"))


def train_from_corpus(corpus: Path, out: Path, *, model: str = "demo", steps: int = 600, batch: int = 32,
                      seed: int = 0) -> dict:
    """Train the ``model`` preset's conv AE on ``corpus/t2i/train.jsonl`` (PSNR on up to 200 images of
    ``t2i/val.jsonl`` when it exists), write it to ``out``; returns the report."""
    cfg = UniGenDetConfig.from_name(model).vae
    val_path = corpus / "t2i" / "val.jsonl"
    held_out = load_t2i_images(val_path)[:200] if val_path.is_file() else None
    ae, report = train_autoencoder(cfg, load_t2i_images(corpus / "t2i" / "train.jsonl"), steps=steps, batch=batch,
                                   seed=seed, held_out=held_out)
    save_autoencoder(ae, out, report)
    return report


def main_train_ae(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="unigendet train-ae", description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", required=True, type=Path, help="a folder with t2i/train.jsonl (and t2i/val.jsonl)")
    ap.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    ap.add_argument("--model", default="demo", help="the preset whose 'conv' autoencoder is trained")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    report = train_from_corpus(args.corpus, args.out, model=args.model, steps=args.steps, batch=args.batch,
                               seed=args.seed)
    print(json.dumps({**report, "out": str(args.out)}))
    return 0
