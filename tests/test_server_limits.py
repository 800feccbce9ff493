"""A server with an API key and a queue of one: 401s, a 503 with Retry-After when the queue is
full, and a graceful SIGTERM that flushes the chunk store (write-back disk tier) before exiting 0."""

from __future__ import annotations

import json
import time
from typing import Iterator

import httpx
import pytest

from server_process import start_server

KEY = "test-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "Count to one hundred."}], "temperature": 0}


def _wait_first_token(response: httpx.Response) -> Iterator[str]:
    """Read up to the first token; the rest of the lines come back, and must be kept: dropping
    a half-read line iterator closes the connection, which aborts the request."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return lines
    pytest.fail("the stream ended before its first token")


def _health(base_url: str) -> dict:
    return httpx.get(f"{base_url}/health").json()


def test_api_key_queue_full_and_graceful_shutdown(tmp_path):
    kv = tmp_path / "kv"
    with start_server(api_key=KEY, max_queue=1, max_num_seqs=1, kv_disk_path=kv, kv_disk_write="back") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.get(f"{url}/v1/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["type"] == "AuthenticationError"
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json"):  # the API's description is behind the key too
            assert httpx.get(f"{url}{path}").status_code == 401
            assert httpx.get(f"{url}{path}", headers=AUTH).status_code == 200

        chunk = httpx.post(f"{url}/v1/chunks", json={"text": "Write-back chunk.\n\n"}, headers=AUTH, timeout=60).json()
        assert not list(kv.rglob("*.safetensors"))  # write-back: only in memory so far

        long = {**CHAT, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers=AUTH, timeout=60) as running:
            rest = _wait_first_token(running)
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers=AUTH, timeout=60):
                assert _health(url)["num_waiting"] == 1
                full = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, headers=AUTH)
                assert full.status_code == 503 and full.headers["Retry-After"]
                assert full.json()["error"]["code"] == 503
            del rest
        deadline = time.monotonic() + 30
        while (_health(url)["num_running"] or _health(url)["num_waiting"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _health(url)["num_running"] == _health(url)["num_waiting"] == 0
        metrics = httpx.get(f"{url}/metrics").text
        assert 'status="rejected"} 1.0' in metrics
    # start_server sent SIGTERM and checked the exit code; closing the store flushed the chunk.
    assert (kv / chunk["id"][:2] / f"{chunk['id']}.safetensors").is_file()


def test_api_docs_can_be_turned_off():
    from fastapi.testclient import TestClient

    from config import Settings
    from server.app import build_app

    client = TestClient(build_app(Settings(api_docs=False)))  # no lifespan: nothing is loaded
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert client.get(path).status_code == 404
    assert TestClient(build_app(Settings())).get("/openapi.json").status_code == 200
