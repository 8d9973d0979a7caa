"""Benchmark: expert routing in the MoT decoder layer.

(a) "scatter": the reference's layout - tokens stay in packed order; every projection (q, k, v, o, the two norms,
    the MLP) runs per expert on gathered rows and is scattered into a fresh full-size zero tensor.
(b) "sorted": ours - tokens are permuted once to [und | gen]; every expert op is a matmul on a contiguous slice.

Both run the SAME MoTDecoderLayer weights and SDPA attention with the same mask; the script checks they agree
and prints one JSON line per configuration (forward+backward ms per layer, peak memory on CUDA).

    python bench/mot_routing.py                       # CPU, tiny and demo widths
    python bench/mot_routing.py --device cuda --dim 3584 --tokens 8192 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from unigendet.model.attention import AttentionMask, SequenceLayout, attend
from unigendet.model.config import MoTConfig
from unigendet.model.layers import apply_rotary, rotary_cos_sin
from unigendet.model.mot import MoTDecoderLayer


def scatter_layer(layer: MoTDecoderLayer, x, und, gen, cos, sin, mask):
    """The reference's routing, written against our weights."""

    def route(fn_und, fn_gen, src, width):
        out = src.new_zeros(src.shape[0], *width)
        out[und] = fn_und(src[und])
        out[gen] = fn_gen(src[gen])
        return out

    e_u, e_g = layer.und, layer.gen
    H, Hk, hd = e_u.n_heads, e_u.n_kv_heads, e_u.head_dim
    h = route(e_u.attn_norm, e_g.attn_norm, x, (x.shape[1],))
    q = route(e_u.wq, e_g.wq, h, (H * hd,)).unflatten(-1, (H, hd))
    k = route(e_u.wk, e_g.wk, h, (Hk * hd,)).unflatten(-1, (Hk, hd))
    v = route(e_u.wv, e_g.wv, h, (Hk * hd,)).unflatten(-1, (Hk, hd))
    q = route(e_u.q_norm, e_g.q_norm, q, (H, hd))
    k = route(e_u.k_norm, e_g.k_norm, k, (Hk, hd))
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    o = attend(q, k, v, mask, "sdpa")
    x = x + route(e_u.wo, e_g.wo, o, (x.shape[1],))
    return x + route(e_u.ffn, e_g.ffn, x, (x.shape[1],))


def run(args) -> dict:
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = MoTConfig(dim=args.dim, n_layers=1, n_heads=args.heads, n_kv_heads=args.kv_heads, mlp_dim=args.mlp,
                    vocab_size=16)
    layer = MoTDecoderLayer(cfg).to(dev, dtype)
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    T = args.tokens
    # samples of 512 tokens: [text 64 causal][ViT image 256 full, und][noisy VAE image 192, gen] -> 37% gen tokens
    n_samples = max(1, T // 512)
    sample_lens, split_lens, modes = [], [], []
    for _ in range(n_samples):
        sample_lens.append(512)
        split_lens += [64, 256, 192]
        modes += ["causal", "full", "noise"]
    T = sum(sample_lens)
    layout = SequenceLayout.build(sample_lens, split_lens, modes, device=dev)
    is_gen = torch.zeros(T, dtype=torch.bool, device=dev)
    starts = torch.arange(n_samples, device=dev) * 512
    for s in starts.tolist():
        is_gen[s + 321: s + 511] = True
    und, gen = (~is_gen).nonzero().squeeze(1), is_gen.nonzero().squeeze(1)
    order = torch.cat([und, gen])
    pos = torch.arange(T, device=dev) % 512
    x = torch.randn(T, args.dim, device=dev, dtype=dtype)
    cos, sin = rotary_cos_sin(pos, cfg.head_dim, cfg.rope_theta, dtype)
    mask_orig = AttentionMask(layout)
    mask_sorted = AttentionMask(layout, order)
    mask_orig.dense(), mask_sorted.dense()
    cos_s, sin_s = cos[order], sin[order]

    def f_scatter(inp):
        return scatter_layer(layer, inp, und, gen, cos, sin, mask_orig)

    def f_sorted(inp):
        xs = inp[order]
        n = und.numel()
        out = torch.cat(layer(xs[:n], xs[n:], cos_s, sin_s, lambda q, k, v: attend(q, k, v, mask_sorted, "sdpa")))
        res = torch.empty_like(out)
        res[order] = out
        return res

    with torch.no_grad():
        a, b = f_scatter(x), f_sorted(x)
    agree = (a.float() - b.float()).abs().max().item()

    def step(fn, inp):
        fn(inp).float().square().mean().backward()

    inp = x.clone().requires_grad_(True)
    for _ in range(args.warmup):
        step(f_scatter, inp), step(f_sorted, inp)
    times: dict[str, list[float]] = {"scatter": [], "sorted": []}
    peaks: dict[str, float | None] = {}
    for _ in range(args.iters):  # interleaved, so machine noise hits both alike; medians reported
        for name, fn in (("scatter", f_scatter), ("sorted", f_sorted)):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            step(fn, inp)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() / 2**30
            times[name].append((time.perf_counter() - t0) * 1e3)
    ms_a, ms_b = statistics.median(times["scatter"]), statistics.median(times["sorted"])
    peak_a, peak_b = peaks.get("scatter"), peaks.get("sorted")
    return {"bench": "mot_routing", "device": args.device if dev.type != "cpu" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "dtype": args.dtype, "dim": args.dim, "mlp": args.mlp,
            "tokens": T, "gen_tokens": int(gen.numel()), "iters": args.iters, "fwd_bwd_ms_scatter": round(ms_a, 2),
            "fwd_bwd_ms_sorted": round(ms_b, 2), "speedup": round(ms_a / ms_b, 3),
            "peak_gib_scatter": peak_a and round(peak_a, 3), "peak_gib_sorted": peak_b and round(peak_b, 3),
            "max_abs_diff": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dim", type=int, default=0, help="0 = run the CPU presets (tiny and demo widths)")
    ap.add_argument("--mlp", type=int, default=0)
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    if args.dim:
        args.mlp = args.mlp or int(args.dim * 5.29)
        print(json.dumps(run(args)))
        return
    for dim, heads, kv, mlp in ((64, 4, 2, 128), (192, 6, 2, 512), (512, 8, 2, 1536)):
        args.dim, args.heads, args.kv_heads, args.mlp = dim, heads, kv, mlp
        print(json.dumps(run(args)), flush=True)


if __name__ == "__main__":
    main()
