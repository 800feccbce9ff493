"""POST /v1/chat/completions: the chunks go into the last user turn, before its content."""

from __future__ import annotations

import asyncio
import time
from typing import Optional, Union

from fastapi.responses import StreamingResponse

from engine.stats import RequestStats
from server.errors import APIError
from server.protocol import (CacheBlendInfo, ChatCompletionChoice, ChatCompletionRequest, ChatCompletionResponse,
                             ChatCompletionStreamChoice, ChatCompletionStreamResponse, ChatMessageOut, DeltaMessage,
                             UsageInfo)
from server.serving_engine import OpenAIServing, collect, random_id, sse_stream, usage_info
from server.tenants import Slot, Tenant, request_salt


class OpenAIServingChat(OpenAIServing):
    """Chat completions, plain or streamed (SSE), with `chunks` and `cacheblend` extensions."""

    async def create_chat_completion(self, body: ChatCompletionRequest, tenant: Tenant,
                                     slot: Slot) -> Union[dict, StreamingResponse]:
        """One chat completion for `tenant`, run in its in-flight `slot` (a stream holds it to the end)."""
        self.check_model(body.model)
        self.check_common(body)
        if body.logprobs or body.top_logprobs:
            raise APIError("logprobs are not supported", 400, "logprobs")
        for tools, choice in (("tools", "tool_choice"), ("functions", "function_call")):
            if getattr(body, tools) or getattr(body, choice) not in (None, "none"):
                raise APIError("tool calling is not supported", 400, tools if getattr(body, tools) else choice)
        salt = request_salt(tenant, body.cache_salt)
        chunks = await self.chunks.resolve(body.chunks, tenant, salt)
        # "developer" is the newer name of "system"; chat templates know only the latter.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
                    for m in body.messages]
        try:
            segments = await asyncio.to_thread(self.engine.chat_segments, messages, chunks.segments, salt)
        except ValueError as e:
            raise APIError(str(e), 400, "messages") from None
        user_turn = await asyncio.to_thread(self.engine.user_turn, messages)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        request_id = random_id("chatcmpl")
        request = self.build_request(request_id, segments, body, max_tokens, "messages", tenant, salt, user_turn)
        stream = await self.submit(request, chunks, tenant)
        model, created = self.state.model_name, int(time.time())

        if body.stream:
            def event(choices: list, **extra) -> ChatCompletionStreamResponse:
                return ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=choices, **extra)

            def delta(text: str, finish_reason: Optional[str], stats: Optional[RequestStats]) -> ChatCompletionStreamResponse:
                choice = ChatCompletionStreamChoice(delta=DeltaMessage(content=text), finish_reason=finish_reason)
                return event([choice], cacheblend=CacheBlendInfo.from_stats(stats) if stats else None)

            def usage(info: UsageInfo) -> ChatCompletionStreamResponse:
                return event([], usage=info)

            first = event([ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))])
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(slot.stream(sse_stream(stream, include_usage, first, delta, usage)),
                                     media_type="text/event-stream")

        result = await collect(stream)
        return ChatCompletionResponse(
            id=request_id, created=created, model=model,
            choices=[ChatCompletionChoice(message=ChatMessageOut(content=result.text), finish_reason=result.finish_reason)],
            usage=usage_info(result.stats),
            cacheblend=CacheBlendInfo.from_stats(result.stats),
        ).model_dump()
