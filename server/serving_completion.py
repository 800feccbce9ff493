"""POST /v1/completions: optional prefix, the chunks, then the prompt."""

from __future__ import annotations

import asyncio
import time
from typing import Optional, Union

from fastapi.responses import StreamingResponse

from engine.stats import RequestStats
from server.errors import APIError
from server.protocol import CacheBlendInfo, CompletionChoice, CompletionRequest, CompletionResponse, CompletionStreamResponse, UsageInfo
from server.serving_engine import OpenAIServing, collect, random_id, sse_stream, usage_info
from server.tenants import Slot, Tenant, request_salt


class OpenAIServingCompletion(OpenAIServing):
    """Text completions, plain or streamed (SSE), with `chunks` and `cacheblend` extensions."""

    async def create_completion(self, body: CompletionRequest, tenant: Tenant, slot: Slot) -> Union[dict, StreamingResponse]:
        """One completion for `tenant`, run in its in-flight `slot` (a stream holds it to the end)."""
        self.check_model(body.model)
        self.check_common(body)
        if body.echo:
            raise APIError("echo is not supported", 400, "echo")
        if body.logprobs is not None:
            raise APIError("logprobs are not supported", 400, "logprobs")
        if body.suffix:
            raise APIError("suffix is not supported", 400, "suffix")
        if body.best_of not in (None, 1):
            raise APIError("only best_of=1 is supported", 400, "best_of")
        salt = request_salt(tenant, body.cache_salt)
        chunks = await self.chunks.resolve(body.chunks, tenant, salt)
        segments = await asyncio.to_thread(self.engine.completion_segments, body.prompt, chunks.segments)
        request_id = random_id("cmpl")
        request = self.build_request(request_id, segments, body, body.max_tokens, "prompt", tenant, salt)
        stream = await self.submit(request, chunks, tenant)
        model, created = self.state.model_name, int(time.time())

        if body.stream:
            def delta(text: str, finish_reason: Optional[str], stats: Optional[RequestStats]) -> CompletionStreamResponse:
                return CompletionStreamResponse(
                    id=request_id, created=created, model=model,
                    choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
                    cacheblend=CacheBlendInfo.from_stats(stats) if stats else None)

            def usage(info: UsageInfo) -> CompletionStreamResponse:
                return CompletionStreamResponse(id=request_id, created=created, model=model, choices=[], usage=info)

            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(slot.stream(sse_stream(stream, include_usage, None, delta, usage)),
                                     media_type="text/event-stream")

        result = await collect(stream)
        return CompletionResponse(
            id=request_id, created=created, model=model,
            choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=usage_info(result.stats),
            cacheblend=CacheBlendInfo.from_stats(result.stats),
        ).model_dump()
