"""`start_server(**settings)`: the real server (`cacheblend serve`) as a child process.

    with start_server(max_queue=4, api_key="k") as base_url:   # "http://127.0.0.1:PORT"
        ...
    with start_server_process(api_keys_file=path) as (base_url, proc):   # proc: to send it signals
        ...

Settings go in as CACHEBLEND_* variables (inherited ones are dropped, so the developer's
environment cannot leak in). The disk KV tier and the chunk registry live in a temporary folder;
the already converted embedded model is reused through a link (no 15 s conversion per server).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from config.settings import DEFAULT_DATA_DIR, Settings
from server.launcher import serve_process


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


@contextlib.contextmanager
def start_server(**settings: Any) -> Iterator[str]:
    """Start the server with these settings (field names of config.Settings); yield its base URL."""
    with start_server_process(**settings) as (base_url, _):
        yield base_url


@contextlib.contextmanager
def start_server_process(**settings: Any) -> Iterator[tuple[str, subprocess.Popen]]:
    """`start_server`, yielding the base URL and the server process."""
    unknown = set(settings) - set(Settings.model_fields)
    if unknown:
        raise TypeError(f"unknown settings: {sorted(unknown)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHEBLEND_")}
    with tempfile.TemporaryDirectory(prefix="cacheblend-server-") as tmp:
        models = Path(os.environ.get("CACHEBLEND_DATA_DIR") or DEFAULT_DATA_DIR) / "models"
        if models.is_dir():
            data_dir = Path(tmp, "data")
            data_dir.mkdir()
            (data_dir / "models").symlink_to(models.resolve(), target_is_directory=True)
            settings = {"data_dir": data_dir, **settings}
        settings = {"kv_disk_path": Path(tmp, "kv"), **settings}
        env.update({f"CACHEBLEND_{name.upper()}": _env_value(v) for name, v in settings.items() if v is not None})
        with serve_process(Path(tmp, "server.log"), env=env) as served:
            yield served
