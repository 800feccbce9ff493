"""The real server (a child process) through the official `openai` client and raw HTTP:
chunk CRUD, chat and completions against the engine's own output, chunk reuse across orders,
streaming, concurrency, cancellation, errors and metrics; on both backends (the native engine,
and vLLM's engine with the CacheBlend connector)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from server_process import start_server_process

# Limits small enough to hit cheaply; none of them changes what the model generates.
LIMITS = dict(max_model_len=1024, max_body_bytes=65536, max_chunks_per_request=4, max_chunk_tokens=64)

PASSAGES = [
    "The Lighthouse of Alexandria was built in the third century BC on the island of Pharos.\n\n",
    "It stood over a hundred metres tall and guided ships into the harbour for centuries.\n\n",
    "Earthquakes damaged it between 956 and 1323, and its stones were later reused in a fort.\n\n",
]
QUESTIONS = [
    "Where was the Lighthouse of Alexandria built?",
    "How tall was the lighthouse?",
    "What happened to the lighthouse?",
    "What did the lighthouse guide?",
]
MAX_TOKENS = 8
# vLLM eager: it starts in seconds (compiling takes minutes and changes no output here)
BACKENDS = {"native": {}, "vllm": {"backend": "vllm", "vllm_engine_args": {"enforce_eager": True}}}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def server(backend):
    with start_server_process(**LIMITS, **BACKENDS[backend]) as served:
        yield served


@pytest.fixture(scope="module")
def base_url(server):
    return server[0]


@pytest.fixture(scope="module")
def client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def chunk_ids(base_url):
    response = httpx.post(f"{base_url}/v1/chunks", json={"texts": PASSAGES}, timeout=120)
    assert response.status_code == 200, response.text
    return [c["id"] for c in response.json()["data"]]


@pytest.fixture(scope="module")
def engine(settings):
    """The engine in this process, with a store like the server's (chunks kept as float16) and
    the tests' compute dtype (conftest's settings; test servers run the same: server_process)."""
    return LLMEngine(settings.model_copy(update={**LIMITS, "kv_disk_bytes": 0}))


def direct(engine: LLMEngine, segments) -> str:
    for segment in segments:
        if segment.kind == "chunk":
            engine.ensure_chunk(segment)  # stored first, as registration does on the server
    request = engine.make_request("direct", segments, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return engine.generate([request])["direct"]["text"]


def chat(client, model, question, chunks, **extra):
    """A greedy chat request; `extra` goes into the body next to `chunks` (e.g. cacheblend=...)."""
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                          max_tokens=MAX_TOKENS, temperature=0, extra_body={"chunks": chunks, **extra})


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of an SSE body, checking the framing; [DONE] stays a string."""
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response: httpx.Response, status: int, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and error["message"]
    assert error["param"] == param
    return error


# --- models, health, chunks ------------------------------------------------------------------

def test_models_and_health(base_url, client):
    models = client.models.list().data
    assert len(models) == 1
    assert models[0].id == "SmolLM2-135M-Instruct"
    assert models[0].max_model_len == LIMITS["max_model_len"]
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["num_running"] == 0


def test_chunk_crud_and_paging(base_url, client, model):
    texts = [f"Paging chunk number {i} is about nothing in particular.\n\n" for i in range(5)]
    first = httpx.post(f"{base_url}/v1/chunks", json={"text": texts[0]}, timeout=60).json()
    assert first["object"] == "chunk" and re.fullmatch(r"[0-9a-f]{64}", first["id"]) and first["tokens"] > 0
    again = httpx.post(f"{base_url}/v1/chunks", json={"text": texts[0]}, timeout=60).json()
    assert again == first  # the ID is the content key: idempotent
    batch = httpx.post(f"{base_url}/v1/chunks", json={"texts": texts[1:]}, timeout=60).json()
    assert batch["object"] == "list" and len(batch["data"]) == 4
    ids = {first["id"]} | {c["id"] for c in batch["data"]}

    one = httpx.get(f"{base_url}/v1/chunks/{first['id']}").json()
    assert one["text"] == texts[0] and one["tokens"] == first["tokens"]

    seen, after = [], None
    while True:
        params = {"limit": 2, **({"after": after} if after else {})}
        page = httpx.get(f"{base_url}/v1/chunks", params=params).json()
        assert page["object"] == "list" and len(page["data"]) <= 2
        seen += [c["id"] for c in page["data"]]
        if not page["has_more"]:
            break
        after = page["data"][-1]["id"]
    assert len(seen) == len(set(seen)) and ids <= set(seen)

    deleted = httpx.delete(f"{base_url}/v1/chunks/{first['id']}").json()
    assert deleted == {"id": first["id"], "object": "chunk", "deleted": True}
    assert_error(httpx.get(f"{base_url}/v1/chunks/{first['id']}"), 404, "chunk_id")
    assert_error(httpx.delete(f"{base_url}/v1/chunks/{first['id']}"), 404, "chunk_id")
    response = httpx.post(f"{base_url}/v1/chat/completions", json={
        "model": model, "messages": [{"role": "user", "content": "hi"}], "chunks": [first["id"]]})
    error = assert_error(response, 404, "chunks")
    assert first["id"] in error["message"]


# --- generation ------------------------------------------------------------------------------

def test_chat_and_completions_match_the_engine(client, model, chunk_ids, engine):
    response = chat(client, model, QUESTIONS[0], chunk_ids)
    segments = engine.chat_segments([{"role": "user", "content": QUESTIONS[0]}],
                                    [engine.chunk_from_text(t) for t in PASSAGES])
    assert response.choices[0].message.content == direct(engine, segments)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.choices[0].finish_reason in ("stop", "length")
    assert response.usage.prompt_tokens == sum(len(s) for s in segments)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    info = response.cacheblend
    assert info["mode"] == "cacheblend" and info["ratio"] == pytest.approx(0.15)
    assert info["tokens_reused"] > 0 and info["tokens_reused"] + info["tokens_recomputed"] == response.usage.prompt_tokens
    for phase in ("ttft_s", "queue_s", "kv_fetch_s", "selection_s", "recompute_s"):
        assert info[phase] >= 0

    # A list of text parts is the same message, and an inline chunk the same chunk as its ID.
    parts = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [{"type": "text", "text": QUESTIONS[0]}]}],
        max_tokens=MAX_TOKENS, temperature=0, extra_body={"chunks": [{"text": PASSAGES[0]}, *chunk_ids[1:]]})
    assert parts.choices[0].message.content == response.choices[0].message.content

    completion = client.completions.create(model=model, prompt="Question: How tall was it?\nAnswer:",
                                           max_tokens=MAX_TOKENS, temperature=0, extra_body={"chunks": chunk_ids[:2]})
    segments = engine.completion_segments("Question: How tall was it?\nAnswer:",
                                          [engine.chunk_from_text(t) for t in PASSAGES[:2]])
    assert completion.choices[0].text == direct(engine, segments)
    assert completion.id.startswith("cmpl-") and completion.cacheblend["chunk_misses"] == 0


def test_chunks_in_another_order_are_reused_from_the_store(client, model, chunk_ids):
    # a cache_salt isolates the request's own cache entries, never the registered chunks it names
    for order, extra in (([0, 1, 2], {}), ([2, 0, 1], {}), ([1, 2, 0], {"cache_salt": "user-7"})):
        response = chat(client, model, QUESTIONS[2], [chunk_ids[i] for i in order], **extra)
        info = response.cacheblend
        assert info["chunk_misses"] == 0
        assert sum(info["chunk_hits"].values()) == 3
        assert info["tokens_reused"] > 0


def test_per_request_overrides_and_sampling(client, model, chunk_ids):
    full = chat(client, model, QUESTIONS[0], chunk_ids, cacheblend={"mode": "full_prefill"})
    assert full.cacheblend["mode"] == "full_prefill" and full.cacheblend["tokens_reused"] == 0
    ratio = chat(client, model, QUESTIONS[0], chunk_ids, cacheblend={"recompute_ratio": 0.5})
    assert ratio.cacheblend["ratio"] == pytest.approx(0.5)

    answer = chat(client, model, QUESTIONS[0], chunk_ids).choices[0].message.content
    word = answer.split()[2]
    stopped = chat(client, model, QUESTIONS[0], chunk_ids, stop=word)
    assert stopped.choices[0].message.content == answer[:answer.index(word)]
    assert stopped.choices[0].finish_reason == "stop"

    sampled = [client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTIONS[0]}], max_tokens=MAX_TOKENS, temperature=0.9,
        top_p=0.9, seed=7, user="tester", extra_body={"chunks": chunk_ids, "top_k": 20}).choices[0].message.content
        for _ in range(2)]
    assert sampled[0] == sampled[1]  # seeded


def test_streaming_with_usage(base_url, client, model, chunk_ids):
    expected = chat(client, model, QUESTIONS[1], chunk_ids).choices[0].message.content
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[1]}], "chunks": chunk_ids,
            "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    first, *deltas, usage_event, _ = events
    assert first["choices"][0]["delta"]["role"] == "assistant" and first["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"]["content"] or "" for e in deltas) == expected
    assert all(e["usage"] is None for e in [first, *deltas])
    assert deltas[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert deltas[-1]["cacheblend"]["chunk_misses"] == 0
    assert usage_event["choices"] == []
    usage = usage_event["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] > 0

    # Without include_usage: no usage key at all; completions stream their text too.
    text = "".join(e.choices[0].text for e in client.completions.create(
        model=model, prompt="The lighthouse stood on", max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"chunks": chunk_ids[:1]}))
    assert text == client.completions.create(model=model, prompt="The lighthouse stood on", max_tokens=MAX_TOKENS,
                                             temperature=0, extra_body={"chunks": chunk_ids[:1]}).choices[0].text


def test_sixteen_concurrent_streams_match_their_sequential_answers(base_url, client, model, chunk_ids):
    expected = {q: chat(client, model, q, chunk_ids).choices[0].message.content for q in QUESTIONS}

    async def stream(aclient: AsyncOpenAI, question: str) -> str:
        events = await aclient.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=MAX_TOKENS, temperature=0,
            stream=True, extra_body={"chunks": chunk_ids})
        return "".join([e.choices[0].delta.content or "" async for e in events if e.choices])

    async def run_all() -> list[str]:
        async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300) as aclient:
            return await asyncio.gather(*(stream(aclient, QUESTIONS[i % 4]) for i in range(16)))

    answers = asyncio.run(run_all())
    assert answers == [expected[QUESTIONS[i % 4]] for i in range(16)]


def test_a_windowed_conversation_reuses_its_turns(backend, base_url, client, model, chunk_ids):
    """A client that keeps only its last 2 turns: the server recognises the turns it has seen
    (no client change), reports their tokens apart from chunks and the exact prefix, and at
    ratio 1.0 answers exactly as with a full prefill. (The vLLM backend keeps no turn KV: its
    answers must still be exact.)"""
    turn_before = _metric(base_url, "cacheblend:prompt_tokens_cached_total", 'source="turn"')

    def converse(blend: dict) -> list:
        history, replies = [], []
        for i, question in enumerate(QUESTIONS):
            messages = history[-4:] + [{"role": "user", "content": question}]
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS, temperature=0,
                                                   extra_body={"chunks": chunk_ids[i % 2:i % 2 + 2], "cacheblend": blend})
            history += [{"role": "user", "content": question}, {"role": "assistant", "content": reply.choices[0].message.content}]
            replies.append(reply)
        return replies

    full = converse({"mode": "full_prefill"})
    blended = converse({"mode": "cacheblend", "recompute_ratio": 1.0})
    assert [r.choices[0].message.content for r in blended] == [r.choices[0].message.content for r in full]
    info = [r.model_extra["cacheblend"] for r in blended]
    if backend == "vllm":
        assert all(i["turn_tokens"] == 0 and i["chunk_tokens"] > 0 for i in info)
        return
    assert all(i["turn_tokens"] > 0 for i in info[2:])
    assert all(i["chunk_tokens"] > 0 and i["exact_tokens"] >= 0 for i in info)
    assert all(i["turn_tokens"] == 0 for i in (r.model_extra["cacheblend"] for r in full))
    assert _metric(base_url, "cacheblend:prompt_tokens_cached_total", 'source="turn"') >= turn_before + sum(
        i["turn_tokens"] for i in info)


def _num_running(base_url: str) -> int:
    return httpx.get(f"{base_url}/health").json()["num_running"]


def _metric(base_url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{base_url}/metrics").text
    pattern = rf"^{re.escape(name)}\{{[^}}]*{re.escape(labels)}[^}}]*\}} (\S+)$"
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def test_a_cancelled_stream_frees_its_slot(base_url, model, chunk_ids):
    aborted_before = _metric(base_url, "cacheblend:requests_total", 'status="aborted"')
    body = {"model": model, "messages": [{"role": "user", "content": QUESTIONS[0]}], "chunks": chunk_ids,
            "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = (json.loads(line[6:]) for line in response.iter_lines() if line)
        while not next(lines)["choices"][0]["delta"].get("content"):
            pass
        assert _num_running(base_url) == 1
    deadline = time.monotonic() + 30
    while _num_running(base_url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _num_running(base_url) == 0
    assert _metric(base_url, "cacheblend:num_requests_running") == 0
    assert _metric(base_url, "cacheblend:requests_total", 'status="aborted"') == aborted_before + 1


# --- errors ----------------------------------------------------------------------------------

def _chat_body(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **fields}


CHAT_ERRORS = [
    ("malformed json", b'{"messages": [', 400, None),
    ("body not an object", b"[1, 2]", 400, None),
    ("messages missing", {"max_tokens": 2}, 400, "messages"),
    ("messages wrong type", {"messages": "hi"}, 400, "messages"),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("image part", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages[0].content"),
    ("bad role", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("last turn not user", {"messages": [{"role": "assistant", "content": "x"}]}, 400, "messages"),
    ("max_tokens wrong type", _chat_body(max_tokens="many"), 400, "max_tokens"),
    ("temperature out of range", _chat_body(temperature=-1), 400, "temperature"),
    ("n above 1", _chat_body(n=2), 400, "n"),
    ("logprobs", _chat_body(logprobs=True), 400, "logprobs"),
    ("unknown model", _chat_body(model="gpt-4"), 404, "model"),
    ("malformed chunk id", _chat_body(chunks=["not-a-key"]), 400, "chunks[0]"),
    ("chunk of wrong type", _chat_body(chunks=[5]), 400, "chunks[0]"),
    ("unknown chunk id", _chat_body(chunks=["ab" * 32]), 404, "chunks"),
    ("too many chunks", _chat_body(chunks=[{"text": f"c{i}"} for i in range(5)]), 400, "chunks"),
    ("inline chunk too long", _chat_body(chunks=[{"text": "word " * 200}]), 400, "chunks[0]"),
    ("context too long", _chat_body(max_tokens=1000), 400, "max_tokens"),
    ("input too long", _chat_body(messages=[{"role": "user", "content": "hello " * 1100}]), 400, "input"),
    ("bad blend mode", _chat_body(cacheblend={"mode": "magic"}), 400, "cacheblend.mode"),
    ("bad blend ratio", _chat_body(cacheblend={"recompute_ratio": 2}), 400, "cacheblend.recompute_ratio"),
    ("lone surrogate in content", {"messages": [{"role": "user", "content": "a\ud800b"}]}, 400, "messages[0].content"),
    ("lone surrogate in inline chunk", _chat_body(chunks=[{"text": "\udfff"}]), 400, "chunks[0].text"),
    ("seed above 64 bits", _chat_body(seed=1 << 64), 400, "seed"),
    ("seed below 64 bits", _chat_body(seed=-(1 << 63) - 1), 400, "seed"),
    ("stream_options without stream", _chat_body(stream_options={"include_usage": True}), 400, "stream_options"),
    ("tools", _chat_body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("tool_choice", _chat_body(tool_choice="required"), 400, "tool_choice"),
]


@pytest.mark.parametrize("body,status,param", [c[1:] for c in CHAT_ERRORS], ids=[c[0] for c in CHAT_ERRORS])
def test_chat_errors(base_url, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{base_url}/v1/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert_error(response, status, param)


def test_other_errors_and_the_engine_still_serves(base_url, client, model, chunk_ids):
    post = lambda path, body: httpx.post(f"{base_url}{path}", json=body, timeout=60)  # noqa: E731
    assert_error(post("/v1/completions", {"prompt": "x", "echo": True}), 400, "echo")
    assert_error(post("/v1/completions", {"prompt": ["a", "b"]}), 400, "prompt")
    assert_error(post("/v1/completions", {"prompt": "x", "chunks": [chunk_ids[0]] * 5}), 400, "chunks")
    assert_error(post("/v1/chunks", {"text": "word " * 200}), 400, "text")
    assert_error(post("/v1/chunks", {"text": ""}), 400, "text")
    assert_error(post("/v1/chunks", {}), 400, None)
    assert_error(post("/v1/chunks", {"texts": ["ok", 5]}), 400, "texts[1]")
    ascii_post = lambda path, body: httpx.post(f"{base_url}{path}", content=json.dumps(body),  # noqa: E731
                                               headers={"content-type": "application/json"}, timeout=60)
    assert_error(ascii_post("/v1/chunks", {"text": "a\ud800"}), 400, "text")  # JSON escapes a lone surrogate
    assert_error(ascii_post("/v1/completions", {"prompt": "\ud800"}), 400, "prompt")
    assert_error(httpx.get(f"{base_url}/v1/chunks/XYZ"), 400, "chunk_id")
    assert_error(httpx.get(f"{base_url}/v1/chunks", params={"limit": 0}), 400, "limit")
    assert_error(httpx.get(f"{base_url}/v1/chunks", params={"after": "ab" * 32}), 400, "after")
    assert_error(httpx.get(f"{base_url}/v1/nothing"), 404)
    # Body limit: by Content-Length, and by the bytes of a body sent without one.
    big = json.dumps(_chat_body(user="x" * LIMITS["max_body_bytes"])).encode()
    assert_error(httpx.post(f"{base_url}/v1/chat/completions", content=big), 413)
    assert_error(httpx.post(f"{base_url}/v1/chat/completions", content=iter([big[:1000], big[1000:]])), 413)
    # Unknown fields are ignored; after all the bad requests the engine still answers.
    response = chat(client, model, QUESTIONS[0], chunk_ids, not_a_field=1)
    assert response.choices[0].message.content


def test_metrics(base_url):
    text = httpx.get(f"{base_url}/metrics").text
    assert _metric(base_url, "cacheblend:time_to_first_token_seconds_count", 'mode="cacheblend"') > 0
    assert _metric(base_url, "cacheblend:requests_total", 'status="ok"') > 0
    assert _metric(base_url, "cacheblend:kv_entries", 'tier="cpu"') >= len(PASSAGES)
    assert _metric(base_url, "cacheblend:chunk_hits_total", 'tier="cpu"') > 0
    assert _metric(base_url, "cacheblend:recompute_ratio") == pytest.approx(0.15)
    assert "cacheblend:num_requests_waiting" in text


def _all_chunk_ids(base_url: str) -> set[str]:
    ids, after = set(), None
    while True:
        page = httpx.get(f"{base_url}/v1/chunks", params={"limit": 100, **({"after": after} if after else {})}).json()
        ids |= {c["id"] for c in page["data"]}
        if not page["has_more"]:
            return ids
        after = page["data"][-1]["id"]


def test_a_refused_request_writes_nothing(base_url, chunk_ids):
    """The whole request is validated before anything is registered."""
    before = _all_chunk_ids(base_url)
    post = lambda path, body: httpx.post(f"{base_url}{path}", json=body, timeout=60)  # noqa: E731
    assert_error(post("/v1/chunks", {"texts": ["a text registered nowhere 17", ""]}), 400, "texts[1]")
    assert_error(post("/v1/chat/completions", _chat_body(chunks=[{"text": "an inline text refused 17"}], max_tokens=1000)),
                 400, "max_tokens")
    assert_error(post("/v1/completions", {"prompt": "x", "chunks": [{"text": "another inline text 17"}], "max_tokens": 5000}),
                 400, "max_tokens")
    assert _all_chunk_ids(base_url) == before
    ok = post("/v1/chat/completions", _chat_body(chunks=[{"text": "an inline text accepted 17"}], max_tokens=1))
    assert ok.status_code == 200, ok.text
    assert len(_all_chunk_ids(base_url) - before) == 1


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def test_a_dead_vllm_engine_fails_health_and_requests(backend, server, model):
    """vLLM's engine processes killed under the server (last test: it leaves the engine dead):
    /health says 503 (an orchestrator restarts it), a request fails with 500, nothing hangs."""
    if backend != "vllm":
        pytest.skip("the native engine runs in the server's own process")
    base_url, proc = server
    engine_pids = _descendants(proc.pid)
    assert engine_pids  # vLLM's engine core and worker
    for pid in engine_pids:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while httpx.get(f"{base_url}/health").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert_error(httpx.get(f"{base_url}/health"), 503)
    response = httpx.post(f"{base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert_error(response, 500)
