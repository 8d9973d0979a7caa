"""Command line: ``unigendet <command> ...`` (also ``python -m unigendet``).

Commands so far:
* ``info``         - describe a preset or a BAGEL/UniGenDet folder (sizes, parameter counts per part); with
                     ``--load`` stream the folder's weights in and print the load report.
* ``inspect-data`` - stream a detection / T2I corpus through the real readers and transforms; one JSON summary.
* ``demo-data``    - build the embedded demo corpus.
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


def _inspect_data(argv: list[str]) -> int:
    from data_modules.inspect import main_inspect

    return main_inspect(argv)


def _demo_data(argv: list[str]) -> int:
    from data_modules.demo_corpus import main_demo_data

    return main_demo_data(argv)


# commands with their own argument parsers (they live in data_modules, which may import unigendet, not vice versa
# at import time: these are imported only when called)
DELEGATED = {"inspect-data": _inspect_data, "demo-data": _demo_data}


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
    for name, help_text in (("inspect-data", "check a corpus before a long run (see `unigendet inspect-data -h`)"),
                            ("demo-data", "build the embedded demo corpus (see `unigendet demo-data -h`)")):
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        return DELEGATED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"unigendet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
