"""What chat and completion serving share: model check, request building, generation, SSE."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional, TypeVar

from fastapi import Request as HTTPRequest
from fastapi.responses import Response
from pydantic import BaseModel

from engine.request import BlendParams, Request, RequestError, RequestOutput
from engine.sampling import SamplingParams
from engine.segments import Segment
from engine.stats import RequestStats
from server.async_engine import QueueFull, RequestStream
from server.errors import APIError
from server.protocol import SamplingRequest, UsageInfo
from server.serving_chunks import OpenAIServingChunks, ResolvedChunks
from server.state import ServerState
from server.tenants import Tenant

T = TypeVar("T")

RETRY_AFTER_S = "1"


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(event: BaseModel, include_usage: bool) -> str:
    """One SSE `data:` line; `usage` only when the client asked for it, `cacheblend` when set."""
    exclude = set() if include_usage else {"usage"}
    if getattr(event, "cacheblend", None) is None:
        exclude.add("cacheblend")
    return f"data: {event.model_dump_json(exclude=exclude)}\n\n"


@dataclass
class Generation:
    """A finished request: its text, why it stopped, and the engine's final stats."""
    text: str
    finish_reason: str
    stats: RequestStats


def usage_info(stats: RequestStats) -> UsageInfo:
    return UsageInfo(prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens,
                     total_tokens=stats.prompt_tokens + stats.completion_tokens)


def _failure(out: RequestOutput) -> APIError:
    if out.finish_reason == "abort":
        return APIError("the request was aborted: the server is shutting down", 503)
    return APIError(f"generation failed: {out.error or 'internal error'}", 500)


class OpenAIServing:
    """Base of the chat and completion serving classes: checks and request building."""

    def __init__(self, state: ServerState, chunks: OpenAIServingChunks):
        self.state = state
        self.engine = state.engine
        self.chunks = chunks

    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.state.model_name:
            raise APIError(f"The model `{model}` does not exist.", 404, "model")

    def check_common(self, body: SamplingRequest) -> None:
        if body.n != 1:
            raise APIError("only n=1 is supported", 400, "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name):
                raise APIError(f"{name} is not supported", 400, name)

    def build_request(self, request_id: str, segments: list[Segment], body: SamplingRequest,
                      max_tokens: Optional[int], input_param: str, tenant: Tenant, salt: str,
                      user_turn: tuple[int, ...] = ()) -> Request:
        """The engine request, resolved once (APIError 400 if the engine refuses it); `salt`:
        the one its segments were keyed with."""
        try:
            sampling = SamplingParams(
                max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                top_k=body.top_k if body.top_k > 0 else -1, seed=body.seed, stop=list(body.stop or []),
                stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos)
            blend = BlendParams(**body.cacheblend.model_dump()) if body.cacheblend else BlendParams()
            return self.engine.make_request(request_id, segments, sampling, blend, input_param, user_turn,
                                            salt=salt, tenant=tenant.name)
        except RequestError as e:
            raise APIError(str(e), 400, e.param) from None
        except ValueError as e:
            raise APIError(str(e), 400) from None

    async def submit(self, request: Request, chunks: ResolvedChunks, tenant: Tenant) -> RequestStream:
        """Queue the request, then record its inline chunks (nothing is written for a refused one)."""
        try:
            stream = self.state.async_engine.submit(request)
        except QueueFull:
            raise APIError("the server is at capacity; retry shortly", 503,
                           headers={"Retry-After": RETRY_AFTER_S}) from None
        try:
            await self.chunks.record(chunks.inline, tenant)
        except BaseException:
            stream.close()
            raise
        return stream


async def collect(stream: RequestStream) -> Generation:
    """Run a request to the end (aborted if the caller is cancelled); APIError if it failed."""
    parts = []
    try:
        async for out in stream:
            parts.append(out.text)
            if out.finished:
                if out.finish_reason in ("error", "abort"):
                    raise _failure(out)
                return Generation("".join(parts), out.finish_reason, out.stats)
    finally:
        stream.close()
    raise APIError("the request ended without output", 500)


async def sse_stream(stream: RequestStream, include_usage: bool, first: Optional[BaseModel],
                     delta: Callable[[str, Optional[str], Optional[RequestStats]], BaseModel],
                     usage: Callable[[UsageInfo], BaseModel]) -> AsyncIterator[str]:
    """SSE strings: `first` (if any), a `delta(text, finish_reason, final_stats)` event per
    output with text or a finish, the `usage` event if asked for, then [DONE]. An error after
    the stream started is sent as an error event before [DONE]; if the client goes away the
    generator is cancelled, which aborts the request."""
    try:
        if first is not None:
            yield sse(first, include_usage)
        async for out in stream:
            if out.finished and out.finish_reason in ("error", "abort"):
                raise _failure(out)
            if out.text or out.finished:
                finished = out.finish_reason if out.finished else None
                yield sse(delta(out.text, finished, out.stats if out.finished else None), include_usage)
            if out.finished and include_usage:
                yield sse(usage(usage_info(out.stats)), True)
    except APIError as e:
        yield f"data: {json.dumps(e.body())}\n\n"
    finally:
        stream.close()
    yield "data: [DONE]\n\n"


async def cancel_on_disconnect(handler: Awaitable[T], raw_request: HTTPRequest) -> T | Response:
    """Await `handler`, cancelling it (which aborts its request) if the client disconnects."""

    async def disconnected() -> None:
        while (await raw_request.receive())["type"] != "http.disconnect":
            pass

    task = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    with contextlib.suppress(asyncio.CancelledError):
        await task  # let it abort its request
    return Response(status_code=499)  # nobody is listening: nginx's "client closed request"
