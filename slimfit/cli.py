"""Command line: `slimfit info`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence


def _info(args: argparse.Namespace) -> int:
    from slimfit import diagnostics

    info = diagnostics.collect()
    print(json.dumps(info, indent=2) if args.json else diagnostics.render(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimfit", description="Memory-efficient full fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="diagnose the installation: versions, compiled kernels, ops")
    info.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    info.set_defaults(run=_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
