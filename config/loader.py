"""Layer the settings sources: defaults < YAML file < CACHEBLEND_* env < CLI flags."""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path
from typing import Any, Optional

import yaml

from config.settings import Settings


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) is typing.Union and bool in typing.get_args(annotation))


def add_settings_flags(parser: argparse.ArgumentParser, fields: Optional[list[str]] = None) -> None:
    """Add one `--kebab-case` flag per settings field (all fields unless `fields` is given).

    Flags default to None so that only what the user typed overrides the other sources;
    pydantic does the type conversion and validation.
    """
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file (env: CACHEBLEND_CONFIG)")
    for name, info in Settings.model_fields.items():
        if fields is not None and name not in fields:
            continue
        help_text = info.description or ""
        if _is_bool(info.annotation):
            parser.add_argument(flag_name(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag_name(name), dest=name, default=None, metavar=name.upper(), help=help_text)


def load_settings(args: Optional[argparse.Namespace] = None, config_file: Optional[Path] = None, **overrides: Any) -> Settings:
    """Build Settings from YAML, environment, parsed CLI flags and explicit overrides (highest)."""
    cli = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None} if args else {}
    path = config_file or (getattr(args, "config", None) if args else None) or os.environ.get("CACHEBLEND_CONFIG")
    file_values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            file_values = yaml.safe_load(f) or {}
        if not isinstance(file_values, dict):
            raise ValueError(f"{path}: expected a mapping of setting names to values")
        unknown = set(file_values) - set(Settings.model_fields)
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
    # pydantic-settings reads the environment itself; init kwargs outrank it, so the YAML
    # values are applied first as a base and only where the environment does not set them.
    env_names = {name for name in Settings.model_fields if f"CACHEBLEND_{name.upper()}" in os.environ}
    base = {k: v for k, v in file_values.items() if k not in env_names}
    return Settings(**{**base, **cli, **overrides})
