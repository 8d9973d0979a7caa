"""Command line: ``unigendet <command> ...`` (also ``python -m unigendet``).

Commands:
* ``fit`` / ``validate`` / ``test`` / ``predict`` - LightningCLI over ``LitUniGenDet`` and a DataModule from
                     ``data_modules``: ``--config experiments/X.yaml`` (stackable), ``--print_config``, dotted
                     overrides.
* ``info``         - describe a preset or a BAGEL/UniGenDet folder (sizes, parameter counts per part); with
                     ``--load`` stream the folder's weights in and print the load report.
* ``detect``       - is this image fake, and why? One JSON line per image.
* ``generate``     - text-to-image; PNGs carrying their prompt and seed in the metadata.
* ``export``       - write a checkpoint in the BAGEL format (weights, configs, tokenizer).
* ``plot``         - loss curves of a run (its ``steps.jsonl``) as a PNG.
* ``inspect-data`` - stream a detection / T2I corpus through the real readers and transforms; one JSON summary.
* ``demo-data``    - build the embedded demo corpus.
* ``leak-probe``   - can real and fake be told apart from file metadata alone (size, PNG bytes, colour stats)?
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from unigendet.constants import DETECTION_PROMPT, DTYPE_NAMES


def _param_counts(model) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        if name.startswith("decoder.layers."):
            part = "decoder." + name.split(".")[3]  # und / gen expert
        elif name.startswith("decoder.norm_"):
            part = "decoder." + name.split(".")[1][len("norm_"):]  # final norms belong to their expert
        counts[part] += p.numel()
    counts["total"] = sum(v for k, v in counts.items())
    return dict(counts)


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from unigendet.model.config import UniGenDetConfig
    from unigendet.model.unigendet import UniGenDet

    if args.bagel_dir and args.load:
        from unigendet.checkpoint.loading import load_model

        model, report = load_model(args.bagel_dir, strict=not args.lenient)
        cfg = model.cfg
        print(str(report), file=sys.stderr)
        extra = {"load_report": {"loaded": len(report.loaded), "missing": report.missing,
                                 "unexpected": report.unexpected, "fresh": report.expected_missing}}
    else:
        if args.bagel_dir:
            from unigendet.model.bagel_config import config_from_bagel_dir

            cfg = config_from_bagel_dir(args.bagel_dir)
        else:
            cfg = UniGenDetConfig.from_name(args.preset)
        with torch.device("meta"):
            model = UniGenDet(cfg)
        extra = {}
    print(json.dumps({"config": cfg.to_dict(), "parameters": _param_counts(model), **extra}))
    return 0


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def resolve_device(device: str | None, dtype: str | None) -> tuple[str, str]:
    """``--device`` / ``--dtype`` as given, else what fits the hardware: CUDA + bf16 when a GPU is present, CPU + fp32
    otherwise. A CUDA device on a machine without one is a ValueError (one line, before any weights are read)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device {device!r} is not a device torch knows ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dtype is None:
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return device, DTYPE_NAMES[dtype]


def _check_ckpt(path: str) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(f"--ckpt {path}: no such file or folder")


def _pipeline(args: argparse.Namespace):
    import torch

    from unigendet.inference import UniGenDetPipeline

    pipe = UniGenDetPipeline.from_pretrained(args.ckpt, device=args.device, dtype=getattr(torch, args.dtype))
    print(f"loaded {args.ckpt} on {args.device} ({args.dtype}): {pipe.load_report}", file=sys.stderr)
    return pipe


def _expand_images(inputs: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            # a dangling symlink is kept: it is reported on its own line (missing_file), not dropped
            paths += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES
                            and (q.is_file() or (q.is_symlink() and not q.exists())))
        else:
            paths.append(p)  # a missing or bad file is reported on its own line
    return paths


def _progress(items: list, enabled: bool, unit: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, unit=unit, file=sys.stderr, dynamic_ncols=True)


def cmd_detect(args: argparse.Namespace) -> int:
    from unigendet.inputs.images import open_image
    from unigendet.inputs.skips import SkipCounter

    # everything that can be checked is checked before the weights are read
    paths = _expand_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {' '.join(args.inputs)}")
    if not any(p.exists() or p.is_symlink() for p in paths):
        raise FileNotFoundError(f"none of the inputs exist: {' '.join(args.inputs)}")
    for name in ("batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _check_ckpt(args.ckpt)
    args.device, args.dtype = resolve_device(args.device, args.dtype)
    pipe = _pipeline(args)
    batches = [paths[i: i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    n_bad = 0
    for batch in _progress(batches, len(paths) > 1 and not args.no_progress, "batch"):
        images, good = [], []
        for path in batch:
            skips = SkipCounter()
            img = open_image(str(path), skips, str(path), max_pixels=args.max_pixels)
            reason = pipe.vit_tf.check(img) if img is not None else None
            if reason:
                skips.skip(reason, str(path))
                img = None
            if img is None:
                reason = next(iter(skips.counts))
                print(json.dumps({"path": str(path), "error": reason}), flush=True)
                n_bad += 1
                continue
            images.append(img)
            good.append(path)
        if not images:
            continue
        results = pipe.detect(images, prompt=args.prompt, with_vae=not args.no_vae, explain=not args.no_explain,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
        for path, r in zip(good, results, strict=True):
            print(json.dumps({"path": str(path), "label": r.label, "p_fake": round(r.p_fake, 6),
                              "explanation": r.explanation, "seconds": round(r.seconds, 4)}), flush=True)
    return 1 if n_bad == len(paths) else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from PIL.PngImagePlugin import PngInfo

    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give --prompt and/or --prompts-file")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    _check_ckpt(args.ckpt)
    args.device, args.dtype = resolve_device(args.device, args.dtype)
    pipe = _pipeline(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the settings actually used, the model's defaults filled in (recorded in each PNG)
    settings = {"height": args.height, "width": args.width,
                **pipe.model.cfg.flow.sampler_settings(args.steps, args.shift, args.cfg_scale, args.cfg_interval,
                                                       args.renorm_min)}
    chunks = [list(range(i, min(i + args.batch_size, len(prompts)))) for i in range(0, len(prompts), args.batch_size)]
    for idx in _progress(chunks, len(chunks) > 1 and not args.no_progress, "batch"):
        seeds = [args.seed + i for i in idx]
        images = pipe.generate([prompts[i] for i in idx], seed=seeds, **settings)
        for i, seed, img in zip(idx, seeds, images, strict=True):
            meta = PngInfo()
            meta.add_text("prompt", prompts[i])
            meta.add_text("seed", str(seed))
            meta.add_text("unigendet", json.dumps({**settings, "seed": seed, "ckpt": str(args.ckpt),
                                                   "dtype": args.dtype}))
            path = out / f"{i:05d}.png"
            img.save(path, pnginfo=meta)
            print(json.dumps({"path": str(path), "prompt": prompts[i], "seed": seed}), flush=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from unigendet.checkpoint.folders import copy_tokenizer, save_folder
    from unigendet.checkpoint.integrity import seal
    from unigendet.checkpoint.loading import is_training_checkpoint, load_lightning_checkpoint, load_model

    _check_ckpt(args.ckpt)
    training = is_training_checkpoint(args.ckpt)  # a .ckpt file or an FSDP2 checkpoint folder: EMA + tokenizer
    if training:
        model, report, tok_json = load_lightning_checkpoint(args.ckpt)
    else:
        model, report = load_model(args.ckpt)
    print(f"loaded {args.ckpt}: {report}", file=sys.stderr)
    if training:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        if tok_json is not None:
            from unigendet.checkpoint.atomic import atomic_path

            with atomic_path(Path(args.out) / "tokenizer.json", what="tokenizer file") as partial:
                partial.write_text(tok_json)
    dtype = getattr(torch, DTYPE_NAMES[args.dtype]) if args.dtype else None
    out = save_folder(model, args.out, dtype=dtype, single_file=args.single_file,
                      max_shard_bytes=int(args.max_shard_gb * 1024**3), progress=not args.no_progress)
    copied = ["tokenizer.json"] if training else copy_tokenizer(args.ckpt, out)
    seal(out, copied, merge=True)  # save_folder sealed the weights and configs
    print(json.dumps({"out": str(out), "files": sorted(p.name for p in out.iterdir()), "tokenizer": copied}))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from unigendet.evaluation.plots import loss_curves_png

    path = Path(args.steps)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (a steps.jsonl written by callbacks.StepLog)")
    out = Path(args.out) if args.out else path.with_suffix(".png")
    loss_curves_png(path, out, keys=args.keys)
    print(json.dumps({"out": str(out)}))
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a BAGEL / UniGenDet model folder, or a training checkpoint (.ckpt "
                                                 "file or FSDP2 folder; its EMA weights)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when a GPU is present)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES), help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--no-progress", action="store_true")


def _inspect_data(argv: list[str]) -> int:
    from data_modules.inspect import main_inspect

    return main_inspect(argv)


def _demo_data(argv: list[str]) -> int:
    from unigendet.demo.corpus import main_demo_data

    return main_demo_data(argv)


def _leak_probe(argv: list[str]) -> int:
    from unigendet.demo.leak_probe import main

    return main(argv)


LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_main(argv: list[str]) -> int:
    from unigendet.lightning_cli import lightning_main as run

    return run(argv)


# commands with their own argument parsers (they live in data_modules, which may import unigendet, not vice versa
# at import time: these are imported only when called)
def _demo(argv: list[str]) -> int:
    from unigendet.demo.runner import main_demo

    return main_demo(argv)


def _train_ae(argv: list[str]) -> int:
    from unigendet.training.autoencoder import main_train_ae

    return main_train_ae(argv)


DELEGATED = {"inspect-data": _inspect_data, "demo-data": _demo_data, "leak-probe": _leak_probe, "demo": _demo,
             "train-ae": _train_ae}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unigendet", description="UniGenDet: generate images and detect fakes.")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="describe a preset or a BAGEL/UniGenDet model folder")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a preset name (tiny, demo, debug, bagel-7b-mot)")
    src.add_argument("--bagel-dir", help="a BAGEL / UniGenDet model folder")
    info.add_argument("--load", action="store_true", help="stream the weights in and report missing/unexpected keys")
    info.add_argument("--lenient", action="store_true", help="with --load: report mismatches instead of failing")
    info.set_defaults(func=cmd_info)

    det = sub.add_parser("detect", help="is this image fake, and why? one JSON line per image")
    det.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    _model_args(det)
    det.add_argument("--no-explain", action="store_true", help="head only: p(fake), no written explanation")
    det.add_argument("--no-vae", action="store_true", help="omit the clean VAE split (as the authors' demo does)")
    det.add_argument("--prompt", default=DETECTION_PROMPT)
    det.add_argument("--max-new-tokens", type=int, default=256)
    det.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    det.add_argument("--seed", type=int, default=0)
    det.add_argument("--batch-size", type=int, default=8)
    det.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (decompression bombs)")
    det.set_defaults(func=cmd_detect)

    gen = sub.add_parser("generate", help="text-to-image; PNGs with prompt and seed in their metadata")
    _model_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    gen.add_argument("--prompts-file", help="one prompt per line (e.g. the GenEval prompts)")
    gen.add_argument("--out", required=True)
    gen.add_argument("--height", type=int, default=512)
    gen.add_argument("--width", type=int, default=512)
    gen.add_argument("--steps", type=int, default=None, help="Euler steps (default: the model's, 50 for BAGEL)")
    gen.add_argument("--shift", type=float, default=None, help="timestep shift (default 3)")
    gen.add_argument("--cfg-scale", type=float, default=None, help="text guidance (default 4)")
    gen.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"))
    gen.add_argument("--renorm-min", type=float, default=None, help="CFG renormalisation floor (0 = off)")
    gen.add_argument("--seed", type=int, default=0, help="image i gets seed + i")
    gen.add_argument("--batch-size", type=int, default=4)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="write a checkpoint in the BAGEL format (weights, configs, tokenizer)")
    exp.add_argument("--ckpt", required=True, help="a BAGEL / UniGenDet model folder")
    exp.add_argument("--out", required=True)
    exp.add_argument("--dtype", default=None, choices=sorted(DTYPE_NAMES), help="cast the weights (default: as stored)")
    exp.add_argument("--single-file", action="store_true", help="one ema.safetensors instead of shards + index")
    exp.add_argument("--max-shard-gb", type=float, default=4.0)
    exp.add_argument("--no-progress", action="store_true")
    exp.set_defaults(func=cmd_export)
    plot = sub.add_parser("plot", help="loss curves of a run: its steps.jsonl (callbacks.StepLog) -> PNG")
    plot.add_argument("steps", help="a steps.jsonl written by callbacks.StepLog")
    plot.add_argument("--out", help="the PNG to write (default: next to the file, .png)")
    plot.add_argument("--keys", nargs="+", help="which values (default: every train/loss_*)")
    plot.set_defaults(func=cmd_plot)

    for name, help_text in (("inspect-data", "check a corpus before a long run (see `unigendet inspect-data -h`)"),
                            ("demo-data", "build the embedded demo corpus (see `unigendet demo-data -h`)"),
                            ("leak-probe", "real vs fake from file metadata alone (see `unigendet leak-probe -h`)"),
                            ("train-ae", "train the demo preset's small autoencoder (see `unigendet train-ae -h`)"),
                            ("demo", "the embedded default: corpus, training, held-out evaluation, samples"),
                            *((c, f"LightningCLI {c} (see `unigendet {c} -h`)") for c in LIGHTNING_COMMANDS)):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    from unigendet.tracking import noise

    argv = sys.argv[1:] if argv is None else list(argv)
    noise.install(evaluation=bool(argv) and argv[0] in ("test", "validate", "predict"))
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:])
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return lightning_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"unigendet {args.command}: error: {collapse_whitespace(str(e))}", file=sys.stderr)
        return 2


def collapse_whitespace(message: str) -> str:
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
