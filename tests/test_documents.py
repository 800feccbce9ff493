"""/v1/documents against the real server (a child process): a 100k-character document
registered with progress events, its pieces checked token by token, analysed window by window
(with the reduce step) and deleted; a registration cancelled midway leaves nothing stored, a
cancelled analysis aborts its windows; sliding windows in full_prefill and at ratio 1.0 agree
(on a short document: a full prefill of the long one's windows would take minutes); bad input
is refused with nothing stored; `cacheblend analyze` end to end."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import httpx
import pytest

from bench.dataset import load, long_document, select_questions
from config.settings import DEFAULT_DATA_DIR
from engine.loader import resolve_model_dir
from engine.segments import tokenize
from kvstore.documents import cover
from server_process import start_server
from test_server_api import _metric, _num_running, assert_error, sse_events

from conftest import DATASET

# Big pieces keep the 100k-character document at ~26 pieces (~2 minutes to precompute here).
MAX_CHUNK_TOKENS = 1024
MAX_DOCUMENT_CHARS = 200_000
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def base_url():
    with start_server(max_chunk_tokens=MAX_CHUNK_TOKENS, max_document_chars=MAX_DOCUMENT_CHARS,
                      kv_disk_bytes=0) as url:
        yield url


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    data_dir = Path(os.environ.get("CACHEBLEND_DATA_DIR") or DEFAULT_DATA_DIR)
    return AutoTokenizer.from_pretrained(str(resolve_model_dir("embedded", data_dir)))


@pytest.fixture(scope="module")
def text():
    """At least 100,000 characters of distinct passages from the dev questions (0-49)."""
    return long_document(select_questions(load(DATASET), 0, 49), 100_000)


@pytest.fixture(scope="module")
def small_doc(base_url, text):
    """A short document of 128-token pieces (the tail of `text`, so no piece is shared)."""
    response = httpx.post(f"{base_url}/v1/documents", json={"text": text[-3000:], "chunk_tokens": 128,
                                                           "overlap_tokens": 16}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def _entries(base_url: str) -> float:
    """Chunks held in the server's KV store (its cpu tier, the only one here)."""
    text = httpx.get(f"{base_url}/metrics").text
    return sum(float(v) for v in re.findall(r'^cacheblend:kv_entries\{[^}]*tier="cpu"[^}]*\} (\S+)$', text, re.M))


def _all(base_url: str, path: str) -> list[str]:
    """Every ID of a paged listing."""
    ids, after = [], None
    while True:
        page = httpx.get(f"{base_url}{path}", params={"limit": 100, **({"after": after} if after else {})}).json()
        ids += [item["id"] for item in page["data"]]
        if not page["has_more"]:
            return ids
        after = ids[-1]


def _stored(base_url: str) -> tuple:
    return _all(base_url, "/v1/documents"), _all(base_url, "/v1/chunks"), _entries(base_url)


def _analyze(base_url: str, doc_id: str, **fields) -> httpx.Response:
    body = {"question": "Which people are mentioned?", "max_tokens": MAX_TOKENS, "temperature": 0, **fields}
    return httpx.post(f"{base_url}/v1/documents/{doc_id}/analyze", json=body, timeout=600)


@pytest.mark.slow
def test_register_analyse_and_delete_a_long_document(base_url, tokenizer, text):
    assert len(text) >= 100_000
    body = {"text": text, "chunk_tokens": MAX_CHUNK_TOKENS, "overlap_tokens": 32, "stream": True}
    response = httpx.post(f"{base_url}/v1/documents", json=body, timeout=900)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    *progress, doc, done = sse_events(response)
    assert done == "[DONE]"
    total = progress[0]["pieces_total"]
    assert [p["pieces_done"] for p in progress] == list(range(total + 1))
    assert all(p == {"object": "document.progress", "pieces_done": i, "pieces_total": total}
               for i, p in enumerate(progress))

    # The pieces: the text tokenized once, cut every 992 tokens into 1024-token pieces.
    ids = tokenize(tokenizer, text)
    spans = cover(len(ids), MAX_CHUNK_TOKENS, MAX_CHUNK_TOKENS - 32)
    assert doc["object"] == "document" and re.fullmatch(r"doc-[0-9a-f]{32}", doc["id"])
    assert (doc["characters"], doc["tokens"], doc["chunk_tokens"], doc["overlap_tokens"]) == (len(text), len(ids), 1024, 32)
    assert len(doc["chunks"]) == len(spans) == total and len(set(doc["chunks"])) == total
    assert all(b - a == 1024 for a, b in spans[:-1]) and spans[-1][1] == len(ids)
    for chunk_id, (a, b) in zip(doc["chunks"], spans):
        chunk = httpx.get(f"{base_url}/v1/chunks/{chunk_id}").json()
        assert chunk["tokens"] == b - a and chunk["text"] == tokenizer.decode(ids[a:b])

    assert httpx.get(f"{base_url}/v1/documents/{doc['id']}").json() == doc
    assert doc["id"] in _all(base_url, "/v1/documents")

    # Windows of 4 pieces, 4 apart: the last one is cut at the document's end.
    response = _analyze(base_url, doc["id"], window=4, reduce=True)
    assert response.status_code == 200, response.text
    analysis = response.json()
    windows = analysis["windows"]
    assert analysis["object"] == "document.analysis" and analysis["document"] == doc["id"]
    assert [(w["index"], w["first_chunk"], w["last_chunk"]) for w in windows] == \
        [(i, a, b - 1) for i, (a, b) in enumerate(cover(total, 4, 4))]
    assert windows[-1]["last_chunk"] == total - 1
    for w in windows:
        assert isinstance(w["answer"], str) and 0 < w["usage"]["completion_tokens"] <= MAX_TOKENS
        pieces = w["last_chunk"] - w["first_chunk"] + 1
        info = w["cacheblend"]  # every piece's KV was stored at registration
        assert info["mode"] == "cacheblend" and info["chunk_misses"] == 0
        assert sum(info["chunk_hits"].values()) == pieces and info["tokens_reused"] > 0
    assert isinstance(analysis["answer"], str)
    usage = analysis["usage"]
    window_total = sum(w["usage"]["total_tokens"] for w in windows)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > window_total  # + reduce

    deleted = httpx.delete(f"{base_url}/v1/documents/{doc['id']}").json()
    assert deleted == {"id": doc["id"], "object": "document", "deleted": True}
    assert_error(httpx.get(f"{base_url}/v1/documents/{doc['id']}"), 404, "document_id")
    assert_error(_analyze(base_url, doc["id"]), 404, "document_id")
    assert_error(httpx.delete(f"{base_url}/v1/documents/{doc['id']}"), 404, "document_id")
    for chunk_id in doc["chunks"]:
        assert_error(httpx.get(f"{base_url}/v1/chunks/{chunk_id}"), 404, "chunk_id")
    assert doc["id"] not in _all(base_url, "/v1/documents")


@pytest.mark.parametrize("stream", [True, False])
def test_a_cancelled_registration_leaves_nothing(base_url, text, stream):
    before = _stored(base_url)
    body = {"text": text[:6000], "chunk_tokens": 256, "overlap_tokens": 16, "stream": stream}
    if stream:  # the client leaves after the first stored piece
        with httpx.stream("POST", f"{base_url}/v1/documents", json=body, timeout=120) as response:
            events = (json.loads(line[6:]) for line in response.iter_lines() if line)
            while next(events)["pieces_done"] < 1:
                pass
    else:  # the client gives up waiting a few pieces in (~7 pieces of about a second each)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/v1/documents", json=body, timeout=3)
    # The piece being computed when the client left is stored, then dropped with the rest.
    deadline = time.monotonic() + 60
    while _entries(base_url) != before[2] and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # longer than a piece takes: nothing lands late
    assert _stored(base_url) == before


def test_sliding_windows_full_prefill_equals_ratio_one(base_url, small_doc):
    n = len(small_doc["chunks"])
    full = _analyze(base_url, small_doc["id"], window=3, stride=2, cacheblend={"mode": "full_prefill"}).json()
    exact = _analyze(base_url, small_doc["id"], window=3, stride=2, cacheblend={"recompute_ratio": 1.0}).json()
    spans = [(w["first_chunk"], w["last_chunk"]) for w in full["windows"]]
    assert spans == [(a, b - 1) for a, b in cover(n, 3, 2)] and spans[-1][1] == n - 1
    assert [w["answer"] for w in full["windows"]] == [w["answer"] for w in exact["windows"]]
    assert all(w["cacheblend"]["mode"] == "full_prefill" and w["cacheblend"]["tokens_reused"] == 0 for w in full["windows"])
    assert all(w["cacheblend"]["ratio"] == 1.0 for w in exact["windows"])
    assert full["answer"] is None


def test_a_cancelled_analysis_aborts_its_windows(base_url, small_doc):
    aborted = _metric(base_url, "cacheblend:requests_total", 'status="aborted"')
    with pytest.raises(httpx.ReadTimeout):  # seven windows of up to 300 tokens: far longer than 2 s
        httpx.post(f"{base_url}/v1/documents/{small_doc['id']}/analyze",
                   json={"question": "Tell me everything.", "window": 1, "max_tokens": 300}, timeout=2)
    deadline = time.monotonic() + 30
    while _num_running(base_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _num_running(base_url) == 0
    assert _metric(base_url, "cacheblend:requests_total", 'status="aborted"') > aborted


BAD_DOCUMENTS = [
    ("empty text", {"text": ""}, 400, "text"),
    ("text not a string", {"text": 5}, 400, "text"),
    ("lone surrogate", b'{"text": "a\\ud800b"}', 400, "text"),
    ("too long", {"text": "ab " * (MAX_DOCUMENT_CHARS // 3 + 1)}, 400, "text"),
    ("overlap equals size", {"text": "a short text", "chunk_tokens": 64, "overlap_tokens": 64}, 400, "overlap_tokens"),
    ("pieces over the chunk limit", {"text": "a short text", "chunk_tokens": MAX_CHUNK_TOKENS + 1}, 400, "chunk_tokens"),
    ("unknown field", {"text": "a short text", "chunk_size": 64}, 400, "chunk_size"),
    ("unknown model", {"text": "a short text", "model": "gpt-4"}, 404, "model"),
]
BAD_ANALYSES = [
    ("window larger than the document", {"window": 99}, 400, "window"),
    ("window 0", {"window": 0}, 400, "window"),
    ("stride 0", {"window": 2, "stride": 0}, 400, "stride"),
    ("stride beyond the window", {"window": 2, "stride": 3}, 400, "stride"),
    ("empty question", {"question": ""}, 400, "question"),
    ("unknown field", {"windows": 2}, 400, "windows"),
]


@pytest.mark.parametrize("name, body, status, param", BAD_DOCUMENTS, ids=[c[0] for c in BAD_DOCUMENTS])
def test_bad_documents_are_refused_and_nothing_stored(base_url, name, body, status, param):
    before = _stored(base_url)
    if isinstance(body, bytes):
        response = httpx.post(f"{base_url}/v1/documents", content=body, headers={"content-type": "application/json"})
    else:
        response = httpx.post(f"{base_url}/v1/documents", json=body, timeout=60)
    assert_error(response, status, param)
    assert _stored(base_url) == before


@pytest.mark.parametrize("name, fields, status, param", BAD_ANALYSES, ids=[c[0] for c in BAD_ANALYSES])
def test_bad_analyses_are_refused(base_url, small_doc, name, fields, status, param):
    before = _stored(base_url)
    assert_error(_analyze(base_url, small_doc["id"], **fields), status, param)
    assert _stored(base_url) == before


def test_unknown_and_malformed_document_ids(base_url):
    unknown = "doc-" + "0" * 32
    assert_error(_analyze(base_url, unknown), 404, "document_id")
    assert_error(httpx.get(f"{base_url}/v1/documents/{unknown}"), 404, "document_id")
    assert_error(httpx.delete(f"{base_url}/v1/documents/{unknown}"), 404, "document_id")
    assert_error(httpx.get(f"{base_url}/v1/documents/not-a-document"), 400, "document_id")
    assert_error(httpx.get(f"{base_url}/v1/documents", params={"after": unknown}), 400, "after")


def test_analyze_cli_registers_answers_and_deletes(base_url, text, tmp_path, capsys):
    from cacheblend.cli import main

    before = _stored(base_url)
    path = tmp_path / "document.txt"
    path.write_text(text[20_000:23_000], encoding="utf-8")  # ~750 tokens: two pieces of the default 512
    assert main(["analyze", str(path), "--question", "Who is mentioned?", "--url", base_url, "--window", "1",
                 "--max-tokens", "2", "--reduce"]) == 0
    out = capsys.readouterr()
    assert [line.split("]")[0] for line in out.out.splitlines()] == ["[pieces 0-0", "[pieces 1-1", "[final"]
    assert "precomputing pieces: 2/2" in out.err
    assert _stored(base_url) == before
