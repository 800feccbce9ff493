"""/v1/chunks: register chunk texts (their KV is precomputed and stored), look up, list, delete.

A chunk's ID is its content key (kvstore.keys.chunk_key): the same text under the same model
and KV format always gets the same ID, so registration is idempotent. Chat and completion
requests resolve their `chunks` through `resolve`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Union

from engine.segments import Segment
from server.errors import APIError
from server.protocol import ChunkCreateRequest, ChunkDeleted, ChunkList, ChunkObject, ChunkText, check_chunk_id
from server.state import ServerState


@dataclass
class ResolvedChunks:
    segments: list[Segment]
    inline: list[tuple[Segment, str]]  # inline texts, recorded once their request is accepted


def _chunk_object(record: dict, with_text: bool = False) -> ChunkObject:
    return ChunkObject(id=record["key"], tokens=len(record["token_ids"]), created=record["created"],
                       text=record["text"] if with_text else None)


def _check_id(chunk_id: str, param: str) -> None:
    """IDs from the path and query (a request body's `chunks` were checked by the protocol)."""
    try:
        check_chunk_id(chunk_id)
    except ValueError as e:
        raise APIError(str(e), 400, param) from None


class OpenAIServingChunks:
    """Chunk registration and lookup, for /v1/chunks and for the generation endpoints."""

    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine
        self.registry = state.registry
        self.settings = state.settings

    # --- used by the generation endpoints --------------------------------------------------

    async def resolve(self, refs: Optional[list[Union[str, ChunkText]]]) -> ResolvedChunks:
        """Segments for a request's `chunks`. Nothing is written: inline texts are recorded by
        `record` once their request is accepted (their KV is made during its prefill). Raises
        APIError 400/404."""
        if not refs:
            return ResolvedChunks([], [])
        if len(refs) > self.settings.max_chunks_per_request:
            raise APIError(f"too many chunks: {len(refs)} (at most {self.settings.max_chunks_per_request})", 400, "chunks")
        segments = await asyncio.to_thread(lambda: [self._resolve_one(ref, f"chunks[{i}]") for i, ref in enumerate(refs)])
        inline = [(seg, ref.text) for seg, ref in zip(segments, refs) if isinstance(ref, ChunkText)]
        return ResolvedChunks(segments, inline)

    async def record(self, inline: list[tuple[Segment, str]]) -> None:
        """Register inline chunk texts (after their request was accepted)."""
        if inline:
            await asyncio.to_thread(lambda: [self.registry.add(seg.chunk_key, text, seg.token_ids) for seg, text in inline])

    def _resolve_one(self, ref: Union[str, ChunkText], param: str) -> Segment:
        if isinstance(ref, ChunkText):
            return self._prepare(ref.text, param)
        record = self.registry.get(ref)
        if record is None:
            raise APIError(f"chunk {ref} not found; register its text with POST /v1/chunks", 404, "chunks")
        segment = self.engine.chunk_segment(tuple(record["token_ids"]))
        if segment.chunk_key != ref:
            raise APIError(f"chunk {ref} was registered for another model or KV format; register its text again",
                           404, "chunks")
        return segment

    def _prepare(self, text: str, param: str) -> Segment:
        """Tokenize and check a chunk text (blocking); nothing is written."""
        segment = self.engine.chunk_from_text(text)
        if not segment.token_ids:
            raise APIError("a chunk must not be empty", 400, param)
        if len(segment) > self.settings.max_chunk_tokens:
            raise APIError(f"chunk has {len(segment)} tokens (at most {self.settings.max_chunk_tokens})", 400, param)
        return segment

    # --- /v1/chunks ------------------------------------------------------------------------

    async def create(self, body: ChunkCreateRequest) -> dict:
        """Register one text or several; the KV of each is precomputed on the engine thread."""
        if body.texts is not None and len(body.texts) > self.settings.max_chunks_per_request:
            raise APIError(f"too many texts: {len(body.texts)} (at most {self.settings.max_chunks_per_request})",
                           400, "texts")
        texts = [(body.text, "text")] if body.texts is None else [(t, f"texts[{i}]") for i, t in enumerate(body.texts)]
        segments = await asyncio.to_thread(lambda: [self._prepare(t, param) for t, param in texts])  # all valid first
        records = await asyncio.to_thread(lambda: [self.registry.add(seg.chunk_key, t, seg.token_ids)
                                                   for seg, (t, _) in zip(segments, texts)])
        objects = []
        for segment, record in zip(segments, records):
            # One job per chunk, so decode steps of running requests interleave with them.
            await self.state.async_engine.run_job(lambda s=segment: self.engine.ensure_chunk(s))
            objects.append(_chunk_object(record))
        if body.texts is None:
            return objects[0].model_dump(exclude_none=True)
        return ChunkList(data=objects).model_dump(exclude_none=True)

    async def retrieve(self, chunk_id: str) -> dict:
        _check_id(chunk_id, "chunk_id")
        record = await asyncio.to_thread(self.registry.get, chunk_id)
        if record is None:
            raise APIError(f"chunk {chunk_id} not found", 404, "chunk_id")
        return _chunk_object(record, with_text=True).model_dump(exclude_none=True)

    async def list(self, after: Optional[str], limit: int) -> dict:
        """A page of chunks in registration order, starting after the ID `after`."""
        if after is not None:
            _check_id(after, "after")
        try:
            records = await asyncio.to_thread(self.registry.list, after, limit + 1)
        except ValueError as e:
            raise APIError(str(e), 400, "after") from None
        page = ChunkList(data=[_chunk_object(r) for r in records[:limit]], has_more=len(records) > limit)
        return page.model_dump(exclude_none=True)

    async def delete(self, chunk_id: str) -> dict:
        """Forget a chunk: its registry record and its KV in every tier."""
        _check_id(chunk_id, "chunk_id")

        def remove() -> bool:
            known = self.registry.delete(chunk_id)
            return self.engine.store.delete(chunk_id) or known

        if not await asyncio.to_thread(remove):
            raise APIError(f"chunk {chunk_id} not found", 404, "chunk_id")
        return ChunkDeleted(id=chunk_id).model_dump()
