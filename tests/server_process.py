"""`start_server(**settings)`: the real server (`cacheblend serve`) as a child process.

    with start_server(max_queue=4, api_key="k") as base_url:   # "http://127.0.0.1:PORT"
        ...
    with start_server_process(api_keys_file=path) as (base_url, proc):   # proc: to send it signals
        ...

Settings go in as CACHEBLEND_* variables (inherited ones are dropped, so the developer's
environment cannot leak in). The disk KV tier and the chunk registry live in a temporary folder;
the already converted embedded model is reused through a link (no 15 s conversion per server).
The benchmarks start servers the same way: the helper lives in bench/services.py.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from bench.services import start_server_process

__all__ = ["start_server", "start_server_process"]


@contextlib.contextmanager
def start_server(**settings: Any) -> Iterator[str]:
    """Start the server with these settings (field names of config.Settings); yield its base URL."""
    with start_server_process(**settings) as (base_url, _):
        yield base_url
