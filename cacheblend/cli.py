"""`cacheblend <command>`: each command lives in the module that does the work.

A command module exposes `register(subparsers)`, which adds its parser and sets
`func(args) -> int` as the parser's default. Only the module of the command being run is
imported, so one command's heavy or optional imports never stop another from starting.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "serve": ("server.cli", "serve the OpenAI-compatible API"),
    "keys": ("server.tenants", "hash an API key for the keys file (read from stdin)"),
    "analyze": ("server.analyze_cli", "one question over a long text file, window by window (a server's client)"),
    "bench": ("bench.cli", "benchmarks: ttft, kv-tiers, load, peer, gpu, documents"),
    "eval": ("bench.eval", "quality and TTFT of every mode on MuSiQue"),
    "tune": ("bench.tune", "pick the smallest recompute ratio within a quality tolerance"),
    "inspect": ("bench.inspect", "HKVD selection and TTFT breakdown of one request"),
    "convert-embedded": ("engine.cli", "write the embedded model's safetensors copy"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cacheblend", description="CacheBlend RAG inference server",
                                     epilog="commands: " + "; ".join(f"{n}: {h}" for n, (_, h) in COMMANDS.items()))
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
