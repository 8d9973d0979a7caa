"""Command line: ``unigendet <command> ...`` (also ``python -m unigendet``).

Commands so far:
* ``info``  - describe a preset or a BAGEL/UniGenDet folder (sizes, parameter counts per part); with ``--load``
  stream the folder's weights in and print the load report (missing / unexpected keys, fresh heads).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter


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
        from unigendet.checkpoint import load_model

        model, report = load_model(args.bagel_dir, strict=not args.lenient)
        cfg = model.cfg
        print(str(report), file=sys.stderr)
        extra = {"load_report": {"loaded": len(report.loaded), "missing": report.missing,
                                 "unexpected": report.unexpected, "fresh": report.expected_missing}}
    else:
        if args.bagel_dir:
            cfg = UniGenDetConfig.from_bagel_dir(args.bagel_dir)
        else:
            cfg = UniGenDetConfig.from_name(args.preset)
        with torch.device("meta"):
            model = UniGenDet(cfg)
        extra = {}
    print(json.dumps({"config": cfg.to_dict(), "parameters": _param_counts(model), **extra}))
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"unigendet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
