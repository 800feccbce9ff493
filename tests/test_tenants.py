"""Tenants: the keys table (hashes, duplicates, reloads), salted keys, in-flight slots, and the
real server with a keys file: ownership of chunks and documents, shared chunks, cache_salt,
per-tenant limits (429), SIGHUP reloads, and tenant metrics that never show a key."""

from __future__ import annotations

import gc
import hashlib
import io
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import pytest

from cacheblend.cli import main
from engine.prefix_cache import boundary_hashes
from engine.segments import Segment
from kvstore.keys import _DOMAIN, _field, chunk_key
from server.errors import APIError
from server.tenants import DEFAULT, InFlight, Limits, Tenant, TenantTable, hash_key, request_salt, tenant_salt
from server_process import start_server_process

KEYS = {"a": "key-of-a", "b": "key-of-b", "ops": "key-of-ops", "lim": "key-of-lim", "gone": "key-of-gone",
        "c": "key-of-c"}
DEFAULT_KEY = "key-of-default"
LIMITS = dict(max_model_len=1024, max_chunks_per_request=4, max_chunk_tokens=64)
TEXT = "The harbour of Pharos was rebuilt in stone after the storm of the third year.\n\n"
SHARED_TEXT = "Public corpus: the lighthouse stood on the eastern point of the island.\n\n"
SALT_TEXT = "A private note on the tides of the western harbour, kept for one user.\n\n"
QUESTION = "What was rebuilt?"


def entry(tenant: str, **extra) -> dict:
    return {"tenant": tenant, "key_sha256": hash_key(KEYS[tenant]), **extra}


def write_keys(path: Path, entries: list[dict]) -> Path:
    path.write_text(json.dumps(entries))
    return path


# --- the keys table, keys and slots (no model) ---------------------------------------------

def test_table_matches_keys_by_hash_and_keeps_the_default_key(tmp_path):
    path = write_keys(tmp_path / "keys.json", [entry("a", max_chunks=3), entry("ops", admin=True)])
    table = TenantTable(api_key=DEFAULT_KEY, path=path)
    assert KEYS["a"] not in path.read_text()
    assert table.lookup(KEYS["a"]) == Tenant("a", limits=Limits(max_chunks=3))
    assert table.lookup(KEYS["ops"]).admin and table.lookup(DEFAULT_KEY) == Tenant(DEFAULT, admin=True)
    assert table.lookup("key-of-nobody") is None and table.lookup("") is None
    assert table.names() == {"a", "ops", DEFAULT} and not table.open
    assert TenantTable().open and TenantTable(api_key="k").lookup("k").name == DEFAULT


def test_table_refuses_repeated_keys_and_disagreeing_entries(tmp_path):
    rotation = [entry("a", max_chunks=3), {**entry("b"), "tenant": "a", "max_chunks": 3}]
    assert TenantTable(path=write_keys(tmp_path / "ok.json", rotation)).lookup(KEYS["b"]).name == "a"  # two keys, one tenant
    for bad in ([entry("a"), entry("a")], [entry("a"), {**entry("b"), "tenant": "a", "admin": True}],
                [{**entry("a"), "tenant": "has space"}], [{**entry("a"), "extra": 1}], {"tenant": "a"}):
        with pytest.raises(ValueError):
            TenantTable(path=write_keys(tmp_path / "bad.json", bad))


def test_a_bad_file_on_reload_keeps_the_old_table_and_no_key_reaches_the_log(tmp_path, caplog):
    path = write_keys(tmp_path / "keys.json", [entry("a")])
    table = TenantTable(path=path)
    path.write_text(json.dumps([{"tenant": "b", "key_sha256": KEYS["b"]}]))  # a plain key by mistake
    with caplog.at_level(logging.ERROR, logger="server.tenants"):
        assert not table.reload()
    assert table.lookup(KEYS["a"]).name == "a" and KEYS["b"] not in caplog.text and "key_sha256" in caplog.text
    path.write_text("not json")
    assert not table.reload() and table.lookup(KEYS["a"]) is not None
    write_keys(path, [entry("b")])
    assert table.reload() and table.lookup(KEYS["a"]) is None and table.lookup(KEYS["b"]).name == "b"


def test_salts_leave_unsalted_keys_unchanged_and_split_salted_ones():
    ids = [5, 17, 42]
    h = hashlib.sha256(_DOMAIN)  # the key as computed before salts existed
    for text in ("model", "float16", "prefix"):
        _field(h, text)
    h.update((3).to_bytes(8, "little") + b"".join(i.to_bytes(8, "little") for i in ids))
    assert chunk_key(ids, "model", "float16", "prefix") == chunk_key(ids, "model", "float16", "prefix", "") == h.hexdigest()
    salted = {chunk_key(ids, "model", "float16", "prefix", s) for s in (tenant_salt("a"), tenant_salt("b"))}
    assert len(salted) == 2 and h.hexdigest() not in salted

    segments = [Segment("prefix", (1, 2)), Segment("suffix", (3,))]
    assert boundary_hashes(segments, "") == boundary_hashes(segments)
    assert [d for d, _ in boundary_hashes(segments, "s")] != [d for d, _ in boundary_hashes(segments)]

    a = Tenant("a")
    assert tenant_salt(DEFAULT) == "" and a.salt == tenant_salt("a") != ""
    assert request_salt(a, None) == a.salt
    assert len({request_salt(a, "u1"), request_salt(a, "u2"), request_salt(Tenant("b"), "u1"), a.salt}) == 4


def test_in_flight_slots_are_limited_and_released_by_blocks_and_streams():
    limited = []
    in_flight = InFlight(on_limited=limited.append)
    tenant = Tenant("a", limits=Limits(max_requests_in_flight=1))
    with in_flight.slot(tenant):
        with pytest.raises(APIError) as refused:
            in_flight.slot(tenant)
        assert refused.value.status == 429 and refused.value.headers["Retry-After"]
        in_flight.slot(Tenant("b")).release()  # other tenants are not counted against it
    assert limited == ["a"]

    async def events() -> AsyncIterator[str]:
        yield "data: 1\n\n"

    with in_flight.slot(tenant) as slot:
        never_started = slot.stream(events())
    with pytest.raises(APIError):
        in_flight.slot(tenant)  # held by the stream after the block
    del never_started
    gc.collect()
    in_flight.slot(tenant).release()  # a stream the server never started is released when collected


def test_keys_hash_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("key-of-a\n"))
    assert main(["keys", "hash"]) == 0
    assert json.loads(capsys.readouterr().out) == {"key_sha256": hash_key("key-of-a")}


# --- the real server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = write_keys(tmp_path_factory.mktemp("keys") / "keys.json",
                      [entry("a"), entry("b"), entry("ops", admin=True),
                       entry("lim", max_chunks=1, max_requests_in_flight=1), entry("gone")])
    with start_server_process(api_keys_file=path, api_key=DEFAULT_KEY, **LIMITS) as (url, proc):
        yield url, proc, path


def call(url: str, method: str, path: str, tenant: str, **kwargs) -> httpx.Response:
    key = DEFAULT_KEY if tenant == DEFAULT else KEYS[tenant]
    return httpx.request(method, f"{url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=120, **kwargs)


def chat_body(chunks: list, **extra) -> dict:
    return {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 2, "temperature": 0, "chunks": chunks,
            **extra}


def error(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == status and body["param"] == param
    return body


def listed(url: str, tenant: str) -> set[str]:
    page = call(url, "GET", "/v1/chunks", tenant, params={"limit": 100}).json()
    assert not page["has_more"]
    return {c["id"] for c in page["data"]}


def test_keys_guard_the_api(server):
    url, _, _ = server
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer key-of-nobody"}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": KEYS["a"]}).status_code == 401  # no scheme
    for tenant in ("a", DEFAULT):
        assert call(url, "GET", "/v1/models", tenant).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_chunks_belong_to_their_tenant(server):
    url, _, _ = server
    id_a = call(url, "POST", "/v1/chunks", "a", json={"text": TEXT}).json()["id"]
    id_b = call(url, "POST", "/v1/chunks", "b", json={"text": TEXT}).json()["id"]
    id_default = call(url, "POST", "/v1/chunks", DEFAULT, json={"text": TEXT}).json()["id"]
    assert len({id_a, id_b, id_default}) == 3  # the same text, one entry per tenant

    missing = "0" * 64
    not_found = error(call(url, "GET", f"/v1/chunks/{missing}", "b"), 404, "chunk_id")["message"]
    for method in ("GET", "DELETE"):
        message = error(call(url, method, f"/v1/chunks/{id_a}", "b"), 404, "chunk_id")["message"]
        assert message == not_found.replace(missing, id_a)  # exactly as if it did not exist
    error(call(url, "POST", "/v1/chat/completions", "b", json=chat_body([id_a])), 404, "chunks")
    assert call(url, "GET", f"/v1/chunks/{id_a}", "a").json()["text"] == TEXT  # B's delete did nothing
    assert call(url, "POST", "/v1/chat/completions", "a", json=chat_body([id_a])).status_code == 200

    mine, theirs = listed(url, "a"), listed(url, "b")
    assert id_a in mine and id_b in theirs and not mine & theirs
    error(call(url, "GET", "/v1/chunks", "b", params={"after": id_a}), 400, "after")


def test_shared_chunks_are_for_everyone_and_made_by_admins(server):
    url, _, _ = server
    refused = error(call(url, "POST", "/v1/chunks", "a", json={"text": SHARED_TEXT, "shared": True}), 403, "shared")
    assert refused["type"] == "PermissionDeniedError"
    shared = call(url, "POST", "/v1/chunks", "ops", json={"text": SHARED_TEXT, "shared": True}).json()
    assert shared["shared"] is True
    for tenant in ("a", "b"):
        assert call(url, "GET", f"/v1/chunks/{shared['id']}", tenant).status_code == 200
        assert shared["id"] in listed(url, tenant)
        reply = call(url, "POST", "/v1/chat/completions", tenant, json=chat_body([shared["id"]])).json()
        assert reply["cacheblend"]["chunk_misses"] == 0  # its KV was stored at registration
    error(call(url, "DELETE", f"/v1/chunks/{shared['id']}", "b"), 403, "chunk_id")
    # Shared chunks are unsalted, as "default" ones: the default key gets the same ID.
    assert call(url, "POST", "/v1/chunks", DEFAULT, json={"text": SHARED_TEXT}).json()["id"] == shared["id"]


def test_cache_salt_separates_reuse(server):
    url, _, _ = server
    before = listed(url, "a")

    def misses(salt: str) -> dict:
        body = chat_body([{"text": SALT_TEXT}], cache_salt=salt)
        return call(url, "POST", "/v1/chat/completions", "a", json=body).json()["cacheblend"]

    assert misses("user-1")["chunk_misses"] == 1
    assert misses("user-2")["chunk_misses"] == 1  # same tenant, same text, another salt: not shared
    again = misses("user-1")
    assert again["chunk_misses"] == 0 and sum(again["chunk_hits"].values()) == 1
    assert listed(url, "a") == before  # salted inline chunks are not registered
    error(call(url, "POST", "/v1/chat/completions", "a", json=chat_body([], cache_salt="x" * 257)), 400, "cache_salt")


def test_documents_belong_to_their_tenant(server):
    url, _, _ = server
    doc = call(url, "POST", "/v1/documents", "a", json={"text": TEXT * 2}).json()
    path = f"/v1/documents/{doc['id']}"
    assert call(url, "GET", path, "a").json()["id"] == doc["id"]
    for method, sub, body in (("GET", "", None), ("DELETE", "", None), ("POST", "/analyze", {"question": QUESTION, "window": 1})):
        error(call(url, method, path + sub, "b", json=body), 404, "document_id")
    assert [d["id"] for d in call(url, "GET", "/v1/documents", "b").json()["data"]] == []
    assert doc["id"] in [d["id"] for d in call(url, "GET", "/v1/documents", "a").json()["data"]]
    assert not set(doc["chunks"]) & listed(url, "b")


def _first_token(response: httpx.Response) -> Iterator[str]:
    """Read up to the first token; the rest of the lines come back and must be kept (dropping a
    half-read line iterator closes the connection, which ends the request)."""
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return lines
    pytest.fail("the stream ended before its first token")


def test_limits_answer_429_with_retry_after(server):
    url, _, _ = server
    assert call(url, "POST", "/v1/chunks", "lim", json={"text": TEXT}).status_code == 200
    full = call(url, "POST", "/v1/chunks", "lim", json={"text": SHARED_TEXT})
    assert error(full, 429)["type"] == "RateLimitError" and int(full.headers["Retry-After"]) > 0
    assert call(url, "POST", "/v1/chunks", "lim", json={"text": TEXT}).status_code == 200  # already held: free
    error(call(url, "POST", "/v1/chat/completions", "lim", json=chat_body([{"text": SHARED_TEXT}])), 429)

    long = {**chat_body([]), "max_tokens": 300, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEYS['lim']}"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers=headers, timeout=120) as running:
        rest = _first_token(running)
        busy = call(url, "POST", "/v1/chat/completions", "lim", json=chat_body([]))
        assert error(busy, 429)["type"] == "RateLimitError" and busy.headers["Retry-After"]
        assert call(url, "POST", "/v1/chat/completions", "a", json=chat_body([])).status_code == 200  # only lim's
        del rest
    deadline = time.monotonic() + 30  # the closed stream frees its slot once the server sees it gone
    while (status := call(url, "POST", "/v1/chat/completions", "lim", json=chat_body([])).status_code) == 429:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert status == 200
    assert _tenant_count(httpx.get(f"{url}/metrics").text, "lim", "limited") >= 1


def _tenant_count(metrics: str, tenant: str, status: str) -> float:
    prefix = "cacheblend:tenant_requests_total{"
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(prefix) and f'tenant="{tenant}"' in line and f'status="{status}"' in line)


def test_metrics_count_tenants_and_never_show_a_key(server):
    url, _, _ = server
    for tenant in ("a", "b"):
        assert call(url, "POST", "/v1/chat/completions", tenant, json=chat_body([])).status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert _tenant_count(metrics, "a", "ok") >= 1 and _tenant_count(metrics, "b", "ok") >= 1
    for secret in [*KEYS.values(), DEFAULT_KEY, *(hash_key(k) for k in KEYS.values())]:
        assert secret not in metrics


def test_sighup_reloads_the_keys_file(server):
    url, proc, path = server
    assert call(url, "GET", "/v1/models", "gone").status_code == 200
    assert call(url, "GET", "/v1/models", "c").status_code == 401
    write_keys(path, [entry("a"), entry("b"), entry("ops", admin=True),
                      entry("lim", max_chunks=1, max_requests_in_flight=1), entry("c")])
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while call(url, "GET", "/v1/models", "c").status_code != 200:
        assert time.monotonic() < deadline, "the new key was not accepted after SIGHUP"
        time.sleep(0.1)
    assert call(url, "GET", "/v1/models", "gone").status_code == 401
    path.write_text("[{broken")
    proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert call(url, "GET", "/v1/models", "c").status_code == 200  # a bad file keeps the table
    assert proc.poll() is None
