"""Benchmark: training throughput on the issue's fixed mixed batch, as tokens/s, TFLOP/s, MFU and peak memory.

The batch (``--layout bagel``, 16,120 tokens): 5 detection samples, each a clean 512x512 VAE image (1,024 latent
tokens), a 448x448 ViT image (1,024 patch tokens), a 30-token prompt, a 70-token answer with CE and the real/fake
head; and 5 text-to-image samples, each a 40-token caption and a noisy 512x512 VAE image with flow loss. Every image
split carries its two marker tokens and every text split two more (<|im_start|> ... <|im_end|>). ``--layout small``
is the same structure with 8x fewer image tokens per side, for CPU runs of the small presets.

Modes (one JSON line per configuration):
* ``fwd_bwd`` - forward + backward of the network on the whole batch, no optimiser step (the number to hold against
  the authors' model: 35,963 tokens/s on one H200 at 4 layers of BAGEL-7B width + the 26-layer ViT, bf16);
* ``coevolution`` - the full co-evolution training step through a real Lightning Trainer and ``LitUniGenDet``:
  the detection update on the 5 detection samples, the generation update on the 5 text-to-image samples with DIGA
  against a frozen teacher (its forward over the captions' clean images and ViT views), both AdamW steps, EMA.

Latents are given ready (the frozen VAE's encoder is not timed; the data path's job). FLOPs are the analytic
model-FLOPs count of ``callbacks.throughput`` (6 x active parameters per trained token, attention over the pairs
the packed mask allows, 2 x for forward-only teacher tokens); MFU divides by ``--peak-tflops`` (the measured bf16
matmul peak of the device: 796 on an H200 in the issue). ``--ac`` wraps every decoder layer and ViT block in
activation checkpointing.

    python bench/train_step.py                                            # CPU, tiny + demo, small layout
    python bench/train_step.py --device cuda --dtype bfloat16 --preset bagel-7b-mot --layers 4 --layout bagel \
        --modes fwd_bwd coevolution --ac both --peak-tflops 796            # the issue's configuration (b)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.throughput import ParamCounts, batch_flops  # noqa: E402
from unigendet.model.config import UniGenDetConfig  # noqa: E402
from unigendet.model.packing import PackedBatch, SamplePlan, TextSplit, VAESplit, ViTSplit, pack  # noqa: E402
from unigendet.model.unigendet import UniGenDet, reduce_losses  # noqa: E402

LAYOUTS = {  # (VAE image px, ViT image px, prompt, answer, caption) per sample
    "bagel": (512, 448, 30, 70, 40),
    "small": (64, 56, 30, 70, 40),
}
N_DET = N_GEN = 5


#####################################################################################################
# the batch
#####################################################################################################


def text_ids(cfg: UniGenDetConfig, n: int, g: torch.Generator) -> list[int]:
    """n token ids; the text split adds its own <|im_start|>/<|im_end|>, so a split of n ids is n + 2 tokens."""
    return torch.randint(0, min(cfg.mot.vocab_size, cfg.tokens.bos) - 1, (n,), generator=g).tolist()


def latent(cfg: UniGenDetConfig, px: int, g: torch.Generator) -> torch.Tensor:
    side = px // cfg.vae.downsample
    return torch.randn(cfg.vae.z_channels, side, side, generator=g)


def vit_image(px: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(3, px, px, generator=g) * 2 - 1


def issue_batches(cfg: UniGenDetConfig, layout: str, seed: int = 0) -> dict[str, list[SamplePlan]]:
    """The detection, text-to-image and DIGA-teacher plans of the benchmark batch."""
    vae_px, vit_px, n_prompt, n_answer, n_caption = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    det = [SamplePlan([VAESplit(latent=latent(cfg, vae_px, g)), ViTSplit(vit_image(vit_px, g)),
                       TextSplit(text_ids(cfg, n_prompt, g)), TextSplit(text_ids(cfg, n_answer, g), loss=True)],
                      label=i % 2) for i in range(N_DET)]
    gen, teacher = [], []
    for _ in range(N_GEN):
        z, caption = latent(cfg, vae_px, g), text_ids(cfg, n_caption, g)
        gen.append(SamplePlan([TextSplit(caption), VAESplit(latent=z, noisy=True, timestep=float(torch.randn(
            (), generator=g)))]))
        teacher.append(SamplePlan([VAESplit(latent=z), TextSplit(caption), ViTSplit(vit_image(vit_px, g))]))
    return {"det": det, "gen": gen, "teacher": teacher}


def build_config(args) -> UniGenDetConfig:
    return UniGenDetConfig.from_name(args.preset, **cfg_overrides(args))


def apply_ac(model: UniGenDet) -> None:
    from torch.distributed._composable import checkpoint

    for unit in [*model.vit.blocks, *model.decoder.layers]:
        checkpoint(unit)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


#####################################################################################################
# modes
#####################################################################################################


def bench_fwd_bwd(args, cfg: UniGenDetConfig, ac: bool) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = UniGenDet(cfg).to(args.device, dtype)
    model.init_weights()
    model.attn_backend = args.backend
    if ac:
        apply_ac(model)
    plans = issue_batches(cfg, args.layout)
    batch: PackedBatch = pack(plans["det"] + plans["gen"], cfg).to(args.device)
    counts = ParamCounts.from_model(model)
    flops = batch_flops(batch, cfg, counts, train=True)
    times = []
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for it in range(args.warmup + args.iters):
        model.zero_grad(set_to_none=True)
        sync(args.device)
        t0 = time.perf_counter()
        out = model(batch)
        sum(reduce_losses(out, batch).values()).backward()
        sync(args.device)
        if it >= args.warmup:
            times.append(time.perf_counter() - t0)
    if args.profile:
        profile_step(args, f"fwd_bwd_ac{int(ac)}", lambda: sum(reduce_losses(model(batch), batch).values()).backward())
    return result(args, cfg, "fwd_bwd", ac, batch.seq_len, len(batch.sample_lens), flops, times)


def profile_step(args, name: str, step) -> None:
    """One more step under torch.profiler: the top operators (by device time on CUDA) as a text table and a
    Chrome trace in ``--profile``."""
    from torch.profiler import ProfilerActivity, profile

    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        step()
        sync(args.device)
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (out / f"{name}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=40))
    prof.export_chrome_trace(str(out / f"{name}.json"))


def bench_coevolution(args, cfg: UniGenDetConfig, ac: bool) -> dict:
    import lightning as L

    from unigendet.distributed.sharding import FSDPConfig
    from unigendet.training.module import LitUniGenDet, Stage

    plans = issue_batches(cfg, args.layout)
    batches = {k: pack(v, cfg) for k, v in plans.items()}
    n_tokens = sum(b.seq_len for b in batches.values())

    class FixedBatches(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader([batches] * (args.warmup + args.iters), batch_size=None)

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync(args.device)
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(args.device)
            self.times.append(time.perf_counter() - self.t0)

    lit = LitUniGenDet(model=args.preset, model_overrides=cfg_overrides(args), attn_backend=args.backend,
                       stage=Stage(diga=True, teacher="frozen"), ema_decay=0.999,
                       fsdp=FSDPConfig(activation_checkpointing=ac))
    timer = StepTimer()
    precision = {"float32": "32-true", "bfloat16": "bf16-true"}[args.dtype]
    trainer = L.Trainer(accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1,
                        max_steps=args.warmup + args.iters, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])
    if ac:
        lit.configure_model()
        apply_ac(lit.model)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(lit, datamodule=FixedBatches())
    counts = ParamCounts.from_model(lit.model)
    flops = (batch_flops(batches["det"], lit.cfg, counts, train=True)
             + batch_flops(batches["gen"], lit.cfg, counts, train=True)
             + batch_flops(batches["teacher"], lit.cfg, counts, train=False))
    return result(args, lit.cfg, "coevolution", ac, n_tokens, N_DET + 2 * N_GEN, flops, timer.times[args.warmup:])


def cfg_overrides(args) -> dict:
    if not args.layers:
        return {}
    return {"mot": {"n_layers": args.layers},
            "head": {"diga_layer": min(args.layers, UniGenDetConfig.from_name(args.preset).head.diga_layer)}}


def result(args, cfg, mode: str, ac: bool, tokens: int, samples: int, flops: float, times: list[float]) -> dict:
    s = statistics.median(times)
    out = {"bench": "train_step", "mode": mode, "preset": args.preset, "layers": cfg.mot.n_layers,
           "vit_layers": cfg.vit.n_layers, "layout": args.layout, "device": args.device, "dtype": args.dtype,
           "backend": args.backend, "activation_checkpointing": ac, "tokens": tokens, "samples": samples,
           "iters": len(times), "step_ms": round(s * 1e3, 1), "tokens_per_s": round(tokens / s),
           "model_tflops_per_step": round(flops / 1e12, 4), "tflops_per_s": round(flops / s / 1e12, 4)}
    if args.peak_tflops:
        out["mfu"] = round(flops / s / (args.peak_tflops * 1e12), 4)
    mem = peak_memory(args.device)
    if mem is not None:
        out["peak_gib"] = round(mem, 2)
        out["peak_kib_per_token"] = round(mem * 2**20 / tokens, 1)
    if not args.device.startswith("cuda"):
        out["threads"] = torch.get_num_threads()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=None, help="default: tiny demo (CPU), bagel-7b-mot (CUDA)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (the issue's GPU case: 4)")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default=None, help="default: small (CPU), bagel (CUDA)")
    ap.add_argument("--modes", nargs="+", choices=["fwd_bwd", "coevolution"], default=["fwd_bwd", "coevolution"])
    ap.add_argument("--ac", choices=["off", "on", "both"], default="off")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: fp32 CPU, bf16 CUDA")
    ap.add_argument("--backend", default="auto", help="attention: auto | sdpa | sdpa_dense | flex")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--profile", default=None, help="folder: also profile one fwd_bwd step (table + Chrome trace)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (H200 bf16: 796)")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    presets = args.preset or (["bagel-7b-mot"] if cuda else ["tiny", "demo"])
    args.layout = args.layout or ("bagel" if cuda else "small")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    for preset in presets:
        args.preset = preset
        cfg = build_config(args)
        for ac in {"off": [False], "on": [True], "both": [False, True]}[args.ac]:
            for mode in args.modes:
                try:
                    row = (bench_fwd_bwd if mode == "fwd_bwd" else bench_coevolution)(args, cfg, ac)
                except torch.OutOfMemoryError as e:  # a result, not a crash: say which configuration did not fit
                    row = {"bench": "train_step", "mode": mode, "preset": preset, "activation_checkpointing": ac,
                           "error": f"out of memory: {str(e).splitlines()[0]}"}
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
