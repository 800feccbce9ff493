"""`cacheblend <command>`: each command lives in the module that does the work.

A command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the parser's default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    ("serve", "server.cli"),
    ("bench", "bench.cli"),
    ("eval", "bench.eval"),
    ("tune", "bench.tune"),
    ("inspect", "bench.inspect"),
    ("convert-embedded", "engine.cli"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheblend", description="CacheBlend RAG inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    for _, module in COMMANDS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
