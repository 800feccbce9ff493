"""/v1/documents: a long text registered as overlapping token pieces, each a chunk with
precomputed KV; looked up, listed, deleted, and analysed window by window.

Registration tokenizes the text once and cuts the token IDs (a piece re-tokenized from its text
could merge tokens differently at its edges). Each piece's KV is one engine job, so running
requests keep decoding in between. Nothing is registered until every piece is stored: the
chunk records and the document record are written together at the end. A registration that
stops early (client gone, failure) deletes the KV it computed for pieces nobody has registered
since; once the final write has begun it completes, and the document exists whole.

Analysis sends one chat request per window through the chat path (same engine, metrics and
errors), all at once so the scheduler batches their decode steps.

A document belongs to the tenant that registered it (its pieces are that tenant's chunks, keyed
with its salt); to any other tenant it is a 404, as an unknown one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Optional, Union

from fastapi.responses import StreamingResponse

from engine.segments import Segment, tokenize
from kvstore import build_documents
from kvstore.documents import cover, is_document_id
from kvstore.registry import owner
from server.errors import APIError
from server.protocol import CacheBlendInfo, ChatCompletionRequest, UsageInfo
from server.protocol_documents import (DocumentAnalysis, DocumentAnalyzeRequest, DocumentCreateRequest, DocumentDeleted,
                                       DocumentList, DocumentObject, DocumentProgress, WindowAnswer)
from server.serving_chat import OpenAIServingChat
from server.serving_engine import random_id
from server.state import ServerState
from server.tenants import Slot, Tenant

log = logging.getLogger(__name__)


@dataclass
class _Split:
    """A validated document cut into pieces; nothing written yet."""
    characters: int
    tokens: int
    chunk_tokens: int
    overlap_tokens: int
    segments: list[Segment]
    texts: list[str]  # each piece's tokens decoded, for the chunk registry


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


def _document(record: dict) -> DocumentObject:
    return DocumentObject(**{k: v for k, v in record.items() if k != "tenant"})  # the owner is not shown


class OpenAIServingDocuments:
    """Document registration, lookup and analysis."""

    def __init__(self, state: ServerState, chat: OpenAIServingChat):
        self.state = state
        self.engine = state.engine
        self.registry = state.registry
        self.settings = state.settings
        self.chat = chat
        self.records = build_documents(state.settings)
        # A delete's "is this piece in another document" check and a registration's final write
        # must not interleave, or a piece still listed could lose its chunk record and KV.
        self._lock = threading.Lock()

    # --- registration ----------------------------------------------------------------------

    async def create(self, body: DocumentCreateRequest, tenant: Tenant) -> Union[dict, StreamingResponse]:
        self.chat.check_model(body.model)
        split = await self._split(body, tenant)
        await asyncio.to_thread(self.chat.chunks.check_room, tenant, split.segments)
        if body.stream:
            return StreamingResponse(self._events(split, tenant), media_type="text/event-stream")
        async with contextlib.aclosing(self._register(split, tenant)) as steps:
            async for step in steps:
                pass
        return step.model_dump()  # the last step: the document

    async def _split(self, body: DocumentCreateRequest, tenant: Tenant) -> _Split:
        """Check the request and cut the text into pieces (APIError 400 for bad input)."""
        s = self.settings
        if len(body.text) > s.max_document_chars:
            raise APIError(f"document has {len(body.text)} characters (at most {s.max_document_chars})", 400, "text")
        # The server's default piece size never exceeds its own chunk limit.
        size = body.chunk_tokens if body.chunk_tokens is not None else min(s.document_chunk_tokens, s.max_chunk_tokens)
        overlap = body.overlap_tokens if body.overlap_tokens is not None else s.document_overlap_tokens
        if size > s.max_chunk_tokens:
            raise APIError(f"chunk_tokens is {size} (at most {s.max_chunk_tokens})", 400, "chunk_tokens")
        if overlap >= size:
            default = "" if body.overlap_tokens is not None else ", the server default"
            raise APIError(f"overlap_tokens ({overlap}{default}) must be smaller than chunk_tokens ({size})",
                           400, "overlap_tokens")

        def cut() -> _Split:
            ids = tokenize(self.engine.tokenizer, body.text)
            segments = [self.engine.chunk_segment(ids[a:b], tenant.salt)
                        for a, b in cover(len(ids), size, size - overlap)] if ids else []
            texts = [self.engine.tokenizer.decode(seg.token_ids) for seg in segments]
            return _Split(len(body.text), len(ids), size, overlap, segments, texts)

        split = await asyncio.to_thread(cut)
        if not split.segments:
            raise APIError("the document has no tokens", 400, "text")
        return split

    async def _events(self, split: _Split, tenant: Tenant) -> AsyncIterator[str]:
        """SSE: progress events, the document, [DONE]; a failure is sent as an error event."""
        async with contextlib.aclosing(self._register(split, tenant)) as steps:
            try:
                async for step in steps:
                    yield _sse(step.model_dump_json())
            except APIError as e:
                yield _sse(json.dumps(e.body()))
            except Exception as e:
                log.exception("document registration failed")
                yield _sse(json.dumps(APIError(f"document registration failed: {e}", 500).body()))
        yield _sse("[DONE]")

    async def _register(self, split: _Split, tenant: Tenant) -> AsyncIterator[Union[DocumentProgress, DocumentObject]]:
        """Store every piece's KV (a progress event after each), then register the document."""
        computed: set[str] = set()  # pieces whose KV this registration made (filled on the engine thread)

        def store_piece(segment: Segment) -> None:
            if not self.engine.store.contains(segment.chunk_key):
                computed.add(segment.chunk_key)
            self.engine.ensure_chunk(segment)

        total = len(split.segments)
        try:
            yield DocumentProgress(pieces_done=0, pieces_total=total)
            for done, segment in enumerate(split.segments, 1):
                await self.state.async_engine.run_job(lambda s=segment: store_piece(s))
                yield DocumentProgress(pieces_done=done, pieces_total=total)
        except BaseException:  # cancelled (client gone), closed at a yield, or failed
            self._discard(computed)
            raise
        record = await asyncio.to_thread(self._commit, split, computed, tenant)
        yield _document(record)

    def _discard(self, computed: set[str]) -> None:
        """Delete the KV a stopped registration computed, unless its piece was registered since.
        Queued on the engine thread (no waiting, so it works while being cancelled): it then runs
        after a piece job still running there, which would otherwise store its piece after the
        delete. Only KV goes, never a record: a registered chunk's KV is recomputed on demand."""

        def drop() -> None:
            for key in computed:
                if key not in self.registry:
                    self.engine.store.delete(key)

        self.state.async_engine.post_job(drop)

    def _commit(self, split: _Split, computed: set[str], tenant: Tenant) -> dict:
        """Register every piece and write the document record (blocking); undone on failure."""
        record = {"id": random_id("doc"), "created": int(time.time()), "characters": split.characters,
                  "tokens": split.tokens, "chunk_tokens": split.chunk_tokens, "overlap_tokens": split.overlap_tokens,
                  "chunks": [seg.chunk_key for seg in split.segments], "tenant": tenant.name}
        with self._lock:
            added = {key for key in record["chunks"] if key not in self.registry}
            try:
                for segment, text in zip(split.segments, split.texts):
                    self.registry.add(segment.chunk_key, text, segment.token_ids, tenant.name)
                self.records.write(record)
            except BaseException:
                for key in added:
                    self.registry.delete(key)
                self._discard(computed)
                raise
        return record

    # --- lookup ----------------------------------------------------------------------------

    async def _record(self, doc_id: str, tenant: Tenant) -> dict:
        if not is_document_id(doc_id):
            raise APIError(f"invalid document ID {doc_id[:80]!r}: expected doc- and 32 hex characters", 400, "document_id")
        record = await asyncio.to_thread(self.records.get, doc_id)
        if record is None or owner(record) != tenant.name:
            raise APIError(f"document {doc_id} not found", 404, "document_id")
        return record

    async def retrieve(self, doc_id: str, tenant: Tenant) -> dict:
        return _document(await self._record(doc_id, tenant)).model_dump()

    async def list(self, after: Optional[str], limit: int, tenant: Tenant) -> dict:
        """A page of the tenant's documents in registration order, starting after the ID `after`."""
        if after is not None and not is_document_id(after):
            raise APIError(f"invalid document ID {after[:80]!r}", 400, "after")
        try:
            records = await asyncio.to_thread(self.records.list, after, limit + 1, tenant.name)
        except ValueError as e:
            raise APIError(str(e), 400, "after") from None
        return DocumentList(data=[_document(r) for r in records[:limit]], has_more=len(records) > limit).model_dump()

    async def delete(self, doc_id: str, tenant: Tenant) -> dict:
        """Forget a document and its pieces (record and KV), except pieces another document lists
        or another tenant owns (a "default" piece may be a shared chunk)."""
        record = await self._record(doc_id, tenant)

        def remove() -> bool:
            with self._lock:
                if not self.records.delete(doc_id):
                    return False  # deleted meanwhile
                listed = {key for other in self.records.all() for key in other["chunks"]}
                for key in set(record["chunks"]) - listed:
                    piece = self.registry.get(key)
                    if piece is None or owner(piece) == tenant.name:
                        self.registry.delete(key)
                        self.engine.store.delete(key)
            return True

        if not await asyncio.to_thread(remove):
            raise APIError(f"document {doc_id} not found", 404, "document_id")
        return DocumentDeleted(id=doc_id).model_dump()

    # --- analysis --------------------------------------------------------------------------

    async def analyze(self, doc_id: str, body: DocumentAnalyzeRequest, tenant: Tenant, slot: Slot) -> dict:
        """The question over each window of pieces, plus the reduce step if asked for: one
        request in flight for `tenant` (its window requests run in the same `slot`)."""
        self.chat.check_model(body.model)
        record = await self._record(doc_id, tenant)
        windows = self._windows(record, body)
        pieces = record["chunks"]
        # Bounded so that a long sweep waits here instead of filling the engine's queue (503).
        slots = asyncio.Semaphore(self.settings.max_num_seqs)

        async def ask(content: str, chunks: Optional[list[str]]) -> dict:
            fields = {"messages": [{"role": "user", "content": content}], "chunks": chunks, "model": body.model,
                      "max_tokens": body.max_tokens, "cacheblend": body.cacheblend}
            if body.temperature is not None:
                fields["temperature"] = body.temperature
            async with slots:
                return await self.chat.create_chat_completion(ChatCompletionRequest(**fields), tenant, slot)

        tasks = [asyncio.ensure_future(ask(body.question, pieces[a:b])) for a, b in windows]
        try:
            replies = await asyncio.gather(*tasks)
        finally:
            for task in tasks:  # one window failed or the client left: stop the others too
                task.cancel()
        answers = [WindowAnswer(index=i, first_chunk=a, last_chunk=b - 1, answer=r["choices"][0]["message"]["content"],
                                usage=UsageInfo(**r["usage"]), cacheblend=CacheBlendInfo(**r["cacheblend"]))
                   for i, ((a, b), r) in enumerate(zip(windows, replies))]
        usages = [w.usage for w in answers]
        final = None
        if body.reduce:
            listing = "\n".join(f"{w.index + 1}. {w.answer.strip()}" for w in answers)
            reply = await ask(f"Answers from parts of the document:\n{listing}\n\nQuestion: {body.question}", None)
            final = reply["choices"][0]["message"]["content"]
            usages.append(UsageInfo(**reply["usage"]))
        total = UsageInfo(prompt_tokens=sum(u.prompt_tokens for u in usages),
                          completion_tokens=sum(u.completion_tokens for u in usages),
                          total_tokens=sum(u.total_tokens for u in usages))
        return DocumentAnalysis(document=doc_id, model=self.state.model_name, windows=answers, answer=final,
                                usage=total).model_dump()

    def _windows(self, record: dict, body: DocumentAnalyzeRequest) -> list[tuple[int, int]]:
        """[start, end) piece spans of the windows (APIError 400 if they cannot be run)."""
        n, window = len(record["chunks"]), body.window
        stride = body.stride if body.stride is not None else window
        if window > n:
            raise APIError(f"window ({window} pieces) is larger than the document ({n} pieces)", 400, "window")
        if window > self.settings.max_chunks_per_request:
            raise APIError(f"window is {window} pieces (at most {self.settings.max_chunks_per_request})", 400, "window")
        if stride > window:
            raise APIError(f"stride ({stride}) must not exceed window ({window}): windows would skip pieces", 400, "stride")
        # The pieces' lengths follow from the record: the same cut as at registration.
        size, overlap = record["chunk_tokens"], record["overlap_tokens"]
        lengths = [b - a for a, b in cover(record["tokens"], size, size - overlap)]
        windows = cover(n, window, stride)
        longest = max(sum(lengths[a:b]) for a, b in windows)
        if longest >= self.engine.max_model_len:
            raise APIError(f"a window of {window} pieces holds up to {longest} tokens; the model takes "
                           f"{self.engine.max_model_len} in all", 400, "window")
        return windows
