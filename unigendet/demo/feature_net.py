"""A feature network for Fréchet distances on the demo corpus, trained on its real images (no weights to download).

FID measures generated images in the features of a network trained to recognise what real images show (Inception,
ImageNet classes). Without the Inception file this is the demo corpus' stand-in: a small CNN trained, by whoever
needs the distance, to tell which photograph (:data:`unigendet.demo.corpus.SOURCES` group) a real training crop was
cut from. The group is read from the crop's caption (each group's subjects are its own), so nothing but the corpus
is needed. Its 128 pooled features are what :func:`features` returns; the held-out source accuracy on the t2i test
images is its sanity check (a network that cannot tell the sources apart measures nothing).

    net, report = train_feature_net(corpus, seed=0)          # ~1 min on 2 cores
    fd = frechet_distance(features(net, generated), features(net, real_test_images))

:func:`save_feature_net` / :func:`load_feature_net` keep it next to a benchmark's runs, so a resumed benchmark
scores with the same network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from unigendet.demo.corpus import SOURCES

PX = 32
"""Side (pixels) every image is brought to: centre square crop, bilinear resize (as ``fd_features``)."""
GROUPS = tuple(dict.fromkeys(s.group for s in SOURCES))


def source_group(caption: str) -> int:
    """Index into :data:`GROUPS` of the photograph a real crop's caption names (its subject is unique to the group).
    Raises ValueError when no subject or several groups' subjects occur."""
    hits = {GROUPS.index(s.group) for s in SOURCES for subject in s.subjects if subject in caption}
    if len(hits) != 1:
        raise ValueError(f"caption names {len(hits)} source groups, expected 1: {caption!r}")
    return hits.pop()


def to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """``(N, 3, PX, PX)`` in [-1, 1]."""
    from unigendet.evaluation.fidelity import fidelity_images

    return fidelity_images(list(images), PX, resample=Image.BILINEAR).float() / 127.5 - 1.0


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SourceNet(nn.Module):
    """Three VGG-style blocks (32 -> 16 -> 8 -> 4 px), global average pooling to 128 features, a linear classifier."""

    def __init__(self, n_classes: int = len(GROUPS), width: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(3, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
                                  _block(2 * width, 4 * width), nn.MaxPool2d(2))
        self.classifier = nn.Linear(4 * width, n_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def _real_split(corpus: Path, split: str) -> tuple[Tensor, Tensor]:
    from unigendet.inputs.records import open_t2i_images
    from unigendet.inputs.skips import SkipCounter

    skips = SkipCounter()
    pairs = open_t2i_images(corpus / "t2i" / f"{split}.jsonl", skips)
    if skips.counts:
        raise ValueError(f"unreadable images in {corpus / 't2i' / split}.jsonl: {dict(skips.counts)}")
    return to_tensor([img for _, img in pairs]), torch.tensor([source_group(c) for c, _ in pairs])


def accuracy(net: SourceNet, x: Tensor, y: Tensor) -> float:
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(x[i: i + 256]).argmax(-1) for i in range(0, len(x), 256)])
    return float((pred == y).float().mean())


def train_feature_net(corpus: str | Path, seed: int = 0, epochs: int = 12, batch: int = 64,
                      lr: float = 2e-3) -> tuple[SourceNet, dict]:
    """Train :class:`SourceNet` on the corpus' real t2i training images (mirror images as augmentation), AdamW with a
    cosine decay; returns the network (eval mode) and a report: held-out accuracy on the t2i test images, chance,
    seconds."""
    corpus = Path(corpus)
    x, y = _real_split(corpus, "train")
    xt, yt = _real_split(corpus, "test")
    batch = min(batch, len(x))  # a tiny corpus: one batch of everything
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SourceNet()
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    t0 = time.perf_counter()
    net.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i: i + batch]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    counts = torch.bincount(yt, minlength=len(GROUPS)).float()
    report = {"heldout_acc": round(accuracy(net, xt, yt), 4), "train_acc": round(accuracy(net, x, y), 4),
              "majority_class": round(float(counts.max() / counts.sum()), 4), "classes": len(GROUPS),
              "train_images": len(x), "heldout_images": len(xt), "steps": steps, "seed": seed,
              "seconds": round(time.perf_counter() - t0, 1)}
    return net.eval(), report


def features(net: SourceNet, images: Sequence[Image.Image]) -> np.ndarray:
    """``(N, 128)`` float64: the pooled features of ``images`` (any sizes; see :data:`PX`)."""
    x = to_tensor(images)
    net.eval()
    with torch.no_grad():
        return torch.cat([net.features(x[i: i + 256]) for i in range(0, len(x), 256)]).double().numpy()


def save_feature_net(net: SourceNet, report: dict, path: str | Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path),
              metadata={"report": json.dumps(report)})


def load_feature_net(path: str | Path) -> tuple[SourceNet, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    net = SourceNet()
    net.load_state_dict(load_file(str(path)))  # strict: every key and shape
    with safe_open(str(path), "pt") as f:
        report = json.loads(f.metadata()["report"])
    return net.eval(), report
