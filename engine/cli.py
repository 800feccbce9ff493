"""`cacheblend convert-embedded`: write the embedded model's safetensors copy (for images)."""

from __future__ import annotations

import argparse

from config import add_settings_flags, load_settings
from engine.loader import convert_embedded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-embedded", help="convert the embedded SmolLM2 GGUF to safetensors under --data-dir")
    add_settings_flags(p, fields=["data_dir"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(convert_embedded(load_settings(args).data_dir))
    return 0
