"""Typed configuration: one schema, read from defaults, YAML, environment and CLI flags."""

from config.loader import add_settings_flags, load_settings
from config.settings import MODES, Mode, Settings

__all__ = ["MODES", "Mode", "Settings", "add_settings_flags", "load_settings"]
