"""The bad-input catalogue: each kind of bad request with the status OpenAI's API / vLLM give it
(400 validation, 401 key, 404 unknown model or chunk, 405 method, 413 body size), checked for
that status and the error shape {"error": {"message", "type", "param", "code"}}; a few valid
but odd inputs must answer 200. Then slow bodies, and the server must still be healthy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import httpx

from bench.faults import API_KEY, MAX_BODY_BYTES, Suite
from bench.faults_client import Tally, healthy
from kvstore.atomic import atomic_write
from kvstore.keys import chunk_key, shard_path

CHAT = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "temperature": 0}
UNKNOWN_ID = "0" * 64


@dataclass(frozen=True)
class Case:
    name: str
    expect: int
    body: Any = None                 # sent as JSON
    raw: Optional[bytes] = None      # sent as is (instead of `body`)
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict = field(default_factory=dict)
    note: str = ""                   # where OpenAI or vLLM answer differently, and why we do this


def chat(**changes: Any) -> dict:
    return {**CHAT, **changes}


def raw_chat(fragment: str) -> bytes:
    """A chat body with a fragment no JSON encoder writes (NaN, a lone surrogate escape...)."""
    return ('{"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, ' + fragment + "}").encode()


def user(content: Any) -> dict:
    return chat(messages=[{"role": "user", "content": content}])


def catalogue(known_id: str, foreign_id: str, max_body: int) -> list[Case]:
    too_long = "word " * 10_000
    return [
        # --- the body as a whole ---
        Case("malformed_json", 400, raw=b'{"messages": [{"role": "user", "content": "hi"'),
        Case("empty_body", 400, raw=b""),
        Case("body_is_array", 400, body=[CHAT]),
        Case("body_is_string", 400, body="hello"),
        Case("body_is_null", 400, raw=b"null"),
        Case("body_not_utf8", 400, raw=b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'),
        Case("deeply_nested", 400, raw=b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        Case("number_of_5000_digits", 400, raw=raw_chat('"seed": ' + "9" * 5000)),
        Case("text_plain_content_type", 400, raw=json.dumps(CHAT).encode(), headers={"content-type": "text/plain"},
             note="vLLM (FastAPI) refuses a non-JSON content type the same way"),
        Case("unknown_field", 200, body=chat(foo=1), note="ignored and logged, as vLLM does (OpenAI: 400)"),
        # --- messages ---
        Case("messages_missing", 400, body={"max_tokens": 2}),
        Case("messages_empty", 400, body=chat(messages=[])),
        Case("messages_not_list", 400, body=chat(messages="hi")),
        Case("message_not_object", 400, body=chat(messages=["hi"])),
        Case("role_unknown", 400, body=chat(messages=[{"role": "wizard", "content": "hi"}])),
        Case("role_missing", 400, body=chat(messages=[{"content": "hi"}])),
        Case("role_tool", 400, body=chat(messages=[{"role": "tool", "content": "1", "tool_call_id": "c1"}])),
        Case("assistant_tool_calls", 400, body=chat(messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                  "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "user", "content": "And now?"}])),
        Case("content_int", 400, body=user(5)),
        Case("content_image_part", 400,
             body=user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}])),
        Case("content_lone_surrogate", 400, raw=raw_chat('"stream": false').replace(b"Say hi.", b"a\\ud800b")),
        Case("unicode_edge_cases", 200,  # combining accent, ZWJ emoji, RTL override, BOM, NUL, the last code point
             body=user("e\u0301 \U0001F468\u200D\U0001F469 \u202Eabc \ufeff\u0000 \U0010FFFF")),
        Case("prompt_over_context", 400, body=user(too_long)),
        # --- sampling fields ---
        Case("max_tokens_string", 400, body=chat(max_tokens="ten")),
        Case("max_tokens_zero", 400, body=chat(max_tokens=0)),
        Case("max_tokens_negative", 400, body=chat(max_tokens=-1)),
        Case("max_tokens_fraction", 400, body=chat(max_tokens=1.5)),
        Case("max_tokens_huge", 400, body=chat(max_tokens=10 ** 30)),
        Case("max_tokens_1e400", 400, raw=raw_chat('"max_completion_tokens": 1e400')),
        Case("temperature_nan", 400, raw=raw_chat('"temperature": NaN')),
        Case("temperature_infinity", 400, raw=raw_chat('"temperature": Infinity')),
        Case("temperature_negative", 400, body=chat(temperature=-0.5)),
        Case("temperature_above_2", 400, body=chat(temperature=2.5)),
        Case("temperature_tiny", 200, body=chat(temperature=1e-300), note="greedy, as vLLM below 1e-5"),
        Case("top_p_nan", 400, raw=raw_chat('"top_p": NaN')),
        Case("top_p_zero", 400, body=chat(top_p=0)),
        Case("top_k_below_minus_1", 400, body=chat(top_k=-3)),
        Case("seed_over_64_bits", 400, body=chat(seed=1 << 64)),
        Case("seed_string", 400, body=chat(seed="x")),
        Case("n_2", 400, body=chat(n=2), note="vLLM supports n > 1; refused here, never ignored"),
        Case("n_0", 400, body=chat(n=0)),
        Case("logprobs", 400, body=chat(logprobs=True), note="unsupported here (vLLM and OpenAI: 200)"),
        Case("top_logprobs", 400, body=chat(top_logprobs=3)),
        Case("presence_penalty_nan", 400, raw=raw_chat('"presence_penalty": NaN')),
        Case("frequency_penalty", 400, body=chat(frequency_penalty=0.5), note="unsupported here (vLLM: 200)"),
        Case("tools", 400, body=chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])),
        Case("tool_choice_required", 400, body=chat(tool_choice="required")),
        Case("functions_legacy", 400, body=chat(functions=[{"name": "f", "parameters": {}}])),
        Case("function_call_legacy", 400, body=chat(function_call={"name": "f"})),
        Case("stream_options_without_stream", 400, body=chat(stream_options={"include_usage": True})),
        Case("stream_options_not_object", 400, body=chat(stream=True, stream_options="yes")),
        Case("stream_options_bad_value", 400, body=chat(stream=True, stream_options={"include_usage": "maybe"})),
        Case("stream_not_bool", 400, body=chat(stream="maybe")),
        Case("stop_int", 400, body=chat(stop=5)),
        Case("stop_lone_surrogate", 400, raw=raw_chat('"stop": ["\\udc00"]')),
        Case("stop_token_ids_strings", 400, body=chat(stop_token_ids=["a"])),
        Case("user_int", 400, body=chat(user=5)),
        Case("model_unknown", 404, body=chat(model="gpt-17")),
        Case("model_int", 400, body=chat(model=5)),
        # --- chunks and extensions ---
        Case("chunks_not_list", 400, body=chat(chunks="abc")),
        Case("chunk_id_malformed", 400, body=chat(chunks=["xyz"])),
        Case("chunk_id_uppercase", 400, body=chat(chunks=[known_id.upper()])),
        Case("chunk_id_unknown", 404, body=chat(chunks=[UNKNOWN_ID])),
        Case("chunk_id_other_model", 404, body=chat(chunks=[foreign_id])),
        Case("chunks_10k", 400, body=chat(chunks=[UNKNOWN_ID] * 10_000)),
        Case("chunk_id_unknown_streaming", 404, body=chat(chunks=[UNKNOWN_ID], stream=True),
             note="refused before the stream starts, as vLLM does with its validation errors"),
        Case("chunk_ids_duplicate", 200, body=chat(chunks=[known_id, known_id]), note="the passage twice, as asked"),
        Case("inline_chunk_empty", 400, body=chat(chunks=[{"text": ""}])),
        Case("inline_chunk_not_string", 400, body=chat(chunks=[{"text": 5}])),
        Case("inline_chunk_lone_surrogate", 400, raw=raw_chat('"chunks": [{"text": "\\ud800"}]')),
        Case("cacheblend_mode_unknown", 400, body=chat(cacheblend={"mode": "turbo"})),
        Case("cacheblend_ratio_2", 400, body=chat(cacheblend={"recompute_ratio": 2})),
        Case("cacheblend_ratio_nan", 400, raw=raw_chat('"cacheblend": {"recompute_ratio": NaN}')),
        Case("cacheblend_check_layer_outside", 400, body=chat(cacheblend={"check_layers": [99]})),
        Case("cache_salt_empty", 400, body=chat(cache_salt="")),
        Case("cache_salt_too_long", 400, body=chat(cache_salt="s" * 300)),
        # --- transport, keys, routes ---
        Case("oversize_body", 413, raw=b" " * (max_body + 1)),
        Case("api_key_wrong", 401, body=CHAT, headers={"authorization": "Bearer wrong"}),
        Case("api_key_missing", 401, body=CHAT, headers={"authorization": ""}),
        Case("api_key_not_bearer", 401, body=CHAT, headers={"authorization": API_KEY}),
        Case("wrong_method", 405, method="GET"),
        Case("unknown_route", 404, path="/v1/nothing-here"),
        # --- /v1/chunks ---
        Case("chunks_post_neither", 400, body={}, path="/v1/chunks"),
        Case("chunks_post_both", 400, body={"text": "a", "texts": ["b"]}, path="/v1/chunks"),
        Case("chunks_post_empty_text", 400, body={"text": ""}, path="/v1/chunks"),
        Case("chunks_post_texts_empty", 400, body={"texts": []}, path="/v1/chunks"),
        Case("chunks_post_texts_one_empty", 400, body={"texts": ["fine.\n\n", ""]}, path="/v1/chunks"),
        Case("chunks_post_text_int", 400, body={"text": 5}, path="/v1/chunks"),
        Case("chunks_post_lone_surrogate", 400, raw=b'{"text": "\\udfff"}', path="/v1/chunks"),
        Case("chunks_post_too_many", 400, body={"texts": [f"text {i}.\n\n" for i in range(65)]}, path="/v1/chunks"),
        Case("chunks_post_too_long", 400, body={"text": too_long}, path="/v1/chunks"),
        Case("chunks_post_shared_not_admin_type", 400, body={"text": "a", "shared": "maybe"}, path="/v1/chunks"),
        Case("chunks_get_malformed", 400, method="GET", path="/v1/chunks/xyz"),
        Case("chunks_get_unknown", 404, method="GET", path=f"/v1/chunks/{UNKNOWN_ID}"),
        Case("chunks_delete_unknown", 404, method="DELETE", path=f"/v1/chunks/{UNKNOWN_ID}"),
        Case("chunks_list_limit_0", 400, method="GET", path="/v1/chunks?limit=0"),
        Case("chunks_list_limit_text", 400, method="GET", path="/v1/chunks?limit=many"),
        Case("chunks_list_after_malformed", 400, method="GET", path="/v1/chunks?after=xyz"),
        Case("chunks_list_limit_huge", 400, method="GET", path="/v1/chunks?limit=1000000000"),
        # --- /v1/documents ---
        Case("document_unknown_field", 400, body={"text": "a", "foo": 1}, path="/v1/documents"),
        Case("document_empty_text", 400, body={"text": ""}, path="/v1/documents"),
        Case("document_id_malformed", 400, method="GET", path="/v1/documents/doc-xyz"),
        Case("document_analyze_unknown", 404, body={"question": "q"},
             path=f"/v1/documents/doc-{UNKNOWN_ID[:32]}/analyze"),
        # --- /v1/completions ---
        Case("completion_prompt_missing", 400, body={"max_tokens": 2}, path="/v1/completions"),
        Case("completion_prompt_two", 400, body={"prompt": ["a", "b"], "max_tokens": 2}, path="/v1/completions",
             note="vLLM batches several prompts; refused here"),
        Case("completion_prompt_tokens", 400, body={"prompt": [1, 2, 3], "max_tokens": 2}, path="/v1/completions"),
        Case("completion_echo", 400, body={"prompt": "a", "echo": True, "max_tokens": 2}, path="/v1/completions"),
        Case("completion_logprobs", 400, body={"prompt": "a", "logprobs": 1, "max_tokens": 2}, path="/v1/completions"),
        Case("completion_best_of", 400, body={"prompt": "a", "best_of": 2, "max_tokens": 2}, path="/v1/completions"),
        Case("completion_suffix", 400, body={"prompt": "a", "suffix": "z", "max_tokens": 2}, path="/v1/completions"),
    ]


def error_shape(data: Any) -> bool:
    """OpenAI's error object: message and type strings, param and code present."""
    error = data.get("error") if isinstance(data, dict) else None
    return (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
            and "param" in error and "code" in error)


async def send(client: httpx.AsyncClient, case: Case) -> tuple[Optional[int], Any]:
    headers = {"content-type": "application/json", **case.headers}
    content = case.raw if case.raw is not None else (None if case.body is None else json.dumps(case.body).encode())
    response = await client.request(case.method, case.path, content=content, headers=headers)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, None


def _foreign_record(state_dir: Path) -> str:
    """A chunk registered by a server of another model on this state folder (as after a model
    swap): its record, whose key this model's server cannot reproduce. Returns its ID."""
    tokens = [1, 2, 3]
    key = chunk_key(tokens, "another-model", "float32", "prefix")
    record = {"key": key, "text": "A chunk of another model.", "token_ids": tokens, "created": int(time.time()),
              "tenant": "default", "shared": False}
    atomic_write(shard_path(state_dir / "chunks", key, ".json"), json.dumps(record).encode())
    return key


async def _trickle(data: bytes, pieces: int, gap_s: float) -> AsyncIterator[bytes]:
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        yield data[i:i + step]
        await asyncio.sleep(gap_s)


async def _health_latency(client: httpx.AsyncClient) -> float:
    start = time.perf_counter()
    await client.get("/health")
    return time.perf_counter() - start


async def _slow_bodies(client: httpx.AsyncClient, tally: Tally) -> list[dict]:
    """A valid body sent over seconds (slow loris), one given up half-way, and an oversize one
    without Content-Length: the first answers, the last is refused, /health stays quick."""
    body = json.dumps(CHAT).encode()
    slow = asyncio.ensure_future(client.post("/v1/chat/completions", content=_trickle(body, 10, 0.3),
                                             headers={"content-type": "application/json"}))
    abandoned = asyncio.ensure_future(client.post("/v1/chat/completions", content=_trickle(body, 10, 1.0),
                                                  headers={"content-type": "application/json"}))
    await asyncio.sleep(1.0)
    health_s = await _health_latency(client)
    abandoned.cancel()
    tally.check("health_quick_during_slow_bodies", health_s < 2.0, f"{health_s:.2f} s")
    oversize = _trickle(b" " * (MAX_BODY_BYTES + (64 << 10)), 20, 0.0)
    results = []
    for name, expect, request in [("slow_loris_body", 200, slow),
                                  ("oversize_chunked", 413, client.post("/v1/chat/completions", content=oversize))]:
        try:
            response = await request
            status, data = response.status_code, response.json()
        except (httpx.HTTPError, ValueError) as e:
            status, data = None, str(e)
        results.append(_judge(tally, Case(name, expect), status, data))
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        await abandoned
    return results


def _judge(tally: Tally, case: Case, status: Optional[int], data: Any) -> dict:
    """Count one case: completed (a right 200), refused (a right error) or failed."""
    shape = status == 200 or error_shape(data)
    right = status == case.expect and shape
    tally.sent += 1
    kind = "failed" if not right else "completed" if status == 200 else "refused"
    setattr(tally, kind, getattr(tally, kind) + 1)
    if not right:
        tally.note(f"{case.name}: expected {case.expect}, got {status} {str(data)[:160]}")
    return {"name": case.name, "expect": case.expect, "status": status, "error_shape": shape, "note": case.note}


async def bad_inputs(suite: Suite, tally: Tally) -> None:
    ref = await suite.reference(tally)
    server = suite.plain()
    known_id = next(iter(ref.ids.values()))
    cases = catalogue(known_id, _foreign_record(server.state_dir), MAX_BODY_BYTES)
    async with suite.client(server.url) as client:
        results = [_judge(tally, case, *await send(client, case)) for case in cases]
        results += await _slow_bodies(client, tally)
        tally.check("every_status_right", all(r["status"] == r["expect"] for r in results))
        tally.check("every_error_shaped", all(r["error_shape"] for r in results))
        tally.check("healthy_after", healthy(server.url))
        await suite.round(client, tally, ref, suite.picks(len(suite.queries)))  # and still answers right
    tally.details = results
    tally.survived(len(results), tally.ok)
