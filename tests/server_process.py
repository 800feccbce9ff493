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

from bench import services

__all__ = ["start_server", "start_server_process"]


@contextlib.contextmanager
def start_server_process(**settings: Any) -> Iterator[tuple]:
    """`bench.services.start_server_process`, computing in float32 unless told otherwise: test
    servers compare answers with the in-process float32 engine and across modes, and in bf16 a
    prefill's logits depend on how the scheduler split it into pieces (timing under concurrency),
    so the same test would depend on the CPU's ISA (`auto` takes bf16 with AVX512-BF16/AMX)."""
    with services.start_server_process(**{"dtype": "float32", **settings}) as served:
        yield served


@contextlib.contextmanager
def start_server(**settings: Any) -> Iterator[str]:
    """Start the server with these settings (field names of config.Settings); yield its base URL."""
    with start_server_process(**settings) as (base_url, _):
        yield base_url
