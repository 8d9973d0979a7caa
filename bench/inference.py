"""Benchmark: inference speed with and without the KV caches.

* generation: seconds per Euler step and per image, cached caption context vs full recomputation every step,
  with classifier-free guidance (two branches), at the given sizes;
* detection: images per second, head only (one forward) and with a decoded explanation (cached vs uncached).

Random weights of a preset (the numbers measure compute, not quality). One JSON line per configuration.

    python bench/inference.py --preset demo --sizes 64 128
    python bench/inference.py --device cuda --dtype bfloat16 --preset bagel-7b-mot --sizes 256 512 --steps 50
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from unigendet.inference import Engine
from unigendet.inputs.tokenizer import train_bpe
from unigendet.model.config import UniGenDetConfig
from unigendet.model.unigendet import UniGenDet

CAPTION = "a close-up photo of a tabby cat sitting on a red wooden bench in a sunny park, warm afternoon light"


def build(preset: str, device: str, layers: int | None = None, dtype: str = "float32") -> Engine:
    overrides = {"mot": {"n_layers": layers}, "head": {"diga_layer": 1}} if layers else {}
    cfg = UniGenDetConfig.from_name(preset, **overrides)
    torch.manual_seed(0)
    model = UniGenDet(cfg).to(device, getattr(torch, dtype))
    model.init_weights()
    with torch.no_grad():  # non-zero heads so decoding does real work
        model.llm2vae.weight.normal_(std=0.02)
    with tempfile.TemporaryDirectory() as d:
        tok = train_bpe([CAPTION, "This is a fake image.", "Does the image looks real/fake?"] * 4, f"{d}/t.json",
                        cfg.mot.vocab_size, min_frequency=1)
    return Engine(model, tok)


def timed(device: str, fn, *args, **kwargs) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the preset's)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    eng = build(args.preset, args.device, args.layers, args.dtype)
    base = {"preset": args.preset, "layers": eng.cfg.mot.n_layers, "device": args.device, "dtype": args.dtype,
            "threads": torch.get_num_threads()}
    prompts = [CAPTION] * args.batch
    for size in args.sizes:
        for use_cache in (True, False):
            eng.generate_latents(prompts[:1], height=size, width=size, steps=2, use_cache=use_cache)  # warm-up
            s = timed(args.device, eng.generate_latents, prompts, height=size, width=size, steps=args.steps,
                      cfg_scale=4.0, use_cache=use_cache)
            print(json.dumps({**base, "bench": "generate", "px": size, "batch": args.batch, "steps": args.steps,
                              "cfg": True, "kv_cache": use_cache, "s_per_step": round(s / (args.steps - 1), 4),
                              "s_per_image": round(s / args.batch, 3)}), flush=True)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)) for s in args.sizes * args.batch]
    eng.detect(images[:1], explain=False)
    s = timed(args.device, eng.detect, images, explain=False)
    print(json.dumps({**base, "bench": "detect", "mode": "head_only", "images": len(images),
                      "images_per_s": round(len(images) / s, 2)}), flush=True)
    for use_cache in (True, False):
        s = timed(args.device, eng.detect, images, max_new_tokens=args.new_tokens, use_cache=use_cache,
                  temperature=1.0)
        print(json.dumps({**base, "bench": "detect", "mode": "explain", "new_tokens": args.new_tokens,
                          "kv_cache": use_cache, "images": len(images), "images_per_s": round(len(images) / s, 3)}),
              flush=True)


if __name__ == "__main__":
    main()
