"""Benchmark: one forward+backward of the whole UniGenDet network on a mixed packed batch.

Prints one JSON line per (preset, attention backend): tokens per second and milliseconds per step (median of
interleaved runs). The batch repeats the test suite's mixed plans (detection with and without the clean VAE split,
text-to-image) until it holds about ``--tokens`` tokens.

    python bench/model_step.py --presets tiny demo --backends sdpa sdpa_dense
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from unigendet.model.config import UniGenDetConfig
from unigendet.model.packing import SamplePlan, TextSplit, VAESplit, ViTSplit, pack
from unigendet.model.unigendet import UniGenDet, reduce_losses


def plans(cfg: UniGenDetConfig, target_tokens: int, g: torch.Generator) -> list[SamplePlan]:
    pv, pt = cfg.vit.patch_size, cfg.vae_pixels_per_token
    ids = lambda n: torch.randint(0, cfg.tokens.bos - 1, (n,), generator=g).tolist()  # noqa: E731
    img = lambda h, w, p: torch.rand(3, h * p, w * p, generator=g) * 2 - 1  # noqa: E731
    out, total = [], 0
    while total < target_tokens:
        det = SamplePlan([VAESplit(image=img(6, 6, pt)), ViTSplit(img(6, 6, pv)), TextSplit(ids(12)),
                          TextSplit(ids(30), loss=True)], label=len(out) % 2)
        t2i = SamplePlan([TextSplit(ids(16)), VAESplit(image=img(6, 6, pt), noisy=True)])
        out += [det, t2i]
        total += (36 + 2) * 3 + 14 + 32 + 18
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "demo"])
    ap.add_argument("--backends", nargs="+", default=["sdpa", "sdpa_dense"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    for preset in args.presets:
        cfg = UniGenDetConfig.from_name(preset)
        torch.manual_seed(0)
        model = UniGenDet(cfg).to(args.device)
        model.init_weights()
        batch = pack(plans(cfg, args.tokens, torch.Generator().manual_seed(0)), cfg).to(args.device)
        # encode the VAE images once, outside the timed region (training encodes in the data path)
        with torch.no_grad():
            lat = [model.vae.encode(im[None])[0] for im in batch.vae_images]
        from unigendet.model.packing import pad_latents

        batch.padded_latent, batch.vae_images = pad_latents(lat), None
        times = {b: [] for b in args.backends}
        for it in range(args.iters + 1):
            for backend in args.backends:
                model.attn_backend = backend
                model.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                out = model(batch)
                sum(reduce_losses(out, batch).values()).backward()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if it:  # the first round is warm-up
                    times[backend].append(time.perf_counter() - t0)
        n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vae."))
        for backend, ts in times.items():
            ms = statistics.median(ts) * 1e3
            print(json.dumps({"bench": "model_step", "preset": preset, "backend": backend, "device": args.device,
                              "threads": torch.get_num_threads(), "tokens": batch.seq_len,
                              "samples": len(batch.sample_lens), "params_without_vae": n_params,
                              "fwd_bwd_ms": round(ms, 1), "tokens_per_s": round(batch.seq_len / ms * 1e3)}),
                  flush=True)


if __name__ == "__main__":
    main()
