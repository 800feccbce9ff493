"""Two server processes sharing one real redis-server reuse each other's chunks."""

import re
import time

import httpx
import pytest

from bench.services import redis_available, start_redis
from conftest import PASSAGES, QUESTION
from server_process import start_server

pytestmark = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed (make test installs it)")


def wait_for_redis_write(base_url: str, timeout_s: float = 30.0) -> None:
    """Shared-tier writes happen in the background: wait until node A reports bytes in Redis."""
    pattern = re.compile(r'^cacheblend:kv_bytes_stored_total\{[^}]*tier="redis"[^}]*\} ([0-9.e+]+)$', re.M)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        m = pattern.search(httpx.get(f"{base_url}/metrics", timeout=10).text)
        if m and float(m.group(1)) > 0:
            return
        time.sleep(0.2)
    raise TimeoutError("node A never wrote the chunk to Redis")


def test_a_chunk_registered_on_one_node_is_served_from_redis_on_the_other():
    with start_redis() as redis_server, \
            start_server(redis_url=redis_server.url) as node_a, \
            start_server(redis_url=redis_server.url) as node_b:
        chunk = httpx.post(f"{node_a}/v1/chunks", json={"text": PASSAGES[0]}, timeout=120).json()
        wait_for_redis_write(node_a)
        body = {"model": httpx.get(f"{node_b}/v1/models").json()["data"][0]["id"],
                "messages": [{"role": "user", "content": QUESTION}], "chunks": [chunk["id"]], "max_tokens": 4,
                "temperature": 0}
        assert httpx.get(f"{node_b}/v1/chunks/{chunk['id']}", timeout=30).status_code == 200  # registry is shared
        reply = httpx.post(f"{node_b}/v1/chat/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        info = reply.json()["cacheblend"]
        assert info["chunk_hits"] == {"redis": 1}, info  # node B never computed it
