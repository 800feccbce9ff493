"""The SSE writer and the non-streaming collector on scripted engine outputs: framing, usage,
an error after the stream started, and aborting on early close."""

from __future__ import annotations

import asyncio
import json
from typing import Optional

import pytest

from engine.request import RequestOutput
from engine.stats import RequestStats
from server.errors import APIError
from server.protocol import CompletionChoice, CompletionStreamResponse, UsageInfo
from server.serving_engine import collect, sse_stream


class ScriptedStream:
    """A RequestStream stand-in that yields the given outputs."""

    def __init__(self, outputs: list[RequestOutput]):
        self._outputs = iter(outputs)
        self.finished = False
        self.aborted = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        out = next(self._outputs, None)
        if out is None:
            raise StopAsyncIteration
        self.finished = out.finished
        return out

    def close(self) -> None:
        if not self.finished:
            self.aborted = True


def token(text: str) -> RequestOutput:
    return RequestOutput("r", text, [1])


def finish(text: str, reason: str, error: Optional[str] = None) -> RequestOutput:
    return RequestOutput("r", text, [1], True, reason, error, RequestStats(prompt_tokens=5, completion_tokens=3, mode="cacheblend"))


def delta(text: str, finish_reason: Optional[str], stats: Optional[RequestStats]) -> CompletionStreamResponse:
    return CompletionStreamResponse(id="cmpl-1", created=0, model="m",
                                    choices=[CompletionChoice(text=text, finish_reason=finish_reason)])


def usage(info: UsageInfo) -> CompletionStreamResponse:
    return CompletionStreamResponse(id="cmpl-1", created=0, model="m", choices=[], usage=info)


def events(stream: ScriptedStream, include_usage: bool) -> list:
    async def run() -> list[str]:
        return [chunk async for chunk in sse_stream(stream, include_usage, None, delta, usage)]

    out = []
    for chunk in asyncio.run(run()):
        assert chunk.startswith("data: ") and chunk.endswith("\n\n")
        payload = chunk[6:-2]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_stream_with_usage():
    got = events(ScriptedStream([token("a"), token(""), finish("b", "length")]), include_usage=True)
    assert [e["choices"][0]["text"] for e in got[:2]] == ["a", "b"]  # an empty delta is not sent
    assert got[1]["choices"][0]["finish_reason"] == "length" and got[0]["usage"] is None
    assert got[2]["choices"] == [] and got[2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert got[3] == "[DONE]"


def test_stream_without_usage_has_no_usage_key():
    got = events(ScriptedStream([token("a"), finish("", "stop")]), include_usage=False)
    assert all("usage" not in e for e in got[:-1]) and len(got) == 3


def test_an_error_after_the_stream_started_is_an_event_then_done():
    got = events(ScriptedStream([token("a"), finish("", "error", "out of memory")]), include_usage=True)
    assert got[0]["choices"][0]["text"] == "a"
    assert got[1]["error"]["code"] == 500 and "out of memory" in got[1]["error"]["message"]
    assert got[2] == "[DONE]"


def test_closing_the_stream_early_aborts_the_request():
    stream = ScriptedStream([token("a"), token("b"), finish("c", "stop")])

    async def read_one() -> None:
        writer = sse_stream(stream, False, None, delta, usage)
        await writer.__anext__()
        await writer.aclose()  # what Starlette does when the client disconnects

    asyncio.run(read_one())
    assert stream.aborted


def test_collect():
    result = asyncio.run(collect(ScriptedStream([token("a"), finish("b", "stop")])))
    assert (result.text, result.finish_reason, result.stats.completion_tokens) == ("ab", "stop", 3)
    with pytest.raises(APIError) as failure:
        asyncio.run(collect(ScriptedStream([finish("", "abort")])))
    assert failure.value.status == 503
