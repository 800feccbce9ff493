"""/v1/chunks: register chunk texts (their KV is precomputed and stored), look up, list, delete.

A chunk's ID is its content key (kvstore.keys.chunk_key) under its tenant's salt: the same text
under the same model, KV format and tenant always gets the same ID (registration is idempotent),
and the same text under two tenants is two chunks. A chunk belongs to the tenant that registered
it: another tenant's ID is a 404 exactly like an unknown one. Admin keys may register shared
chunks (unsalted, visible to every tenant). Chat and completion requests resolve their `chunks`
through `resolve`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Union

from engine.segments import Segment
from kvstore import bytes_per_token_per_layer
from kvstore.registry import visible
from server.errors import APIError
from server.protocol import ChunkCreateRequest, ChunkDeleted, ChunkList, ChunkObject, ChunkText, check_chunk_id
from server.state import ServerState
from server.tenants import Tenant, over_limit

# Stored chunks are freed only when the tenant deletes some: no point retrying at once.
STORAGE_RETRY_AFTER_S = "60"


@dataclass
class ResolvedChunks:
    segments: list[Segment]
    inline: list[tuple[Segment, str]]  # inline texts, recorded once their request is accepted


def _chunk_object(record: dict, with_text: bool = False) -> ChunkObject:
    return ChunkObject(id=record["key"], tokens=len(record["token_ids"]), created=record["created"],
                       shared=True if record.get("shared") else None, text=record["text"] if with_text else None)


def _check_id(chunk_id: str, param: str) -> None:
    """IDs from the path and query (a request body's `chunks` were checked by the protocol)."""
    try:
        check_chunk_id(chunk_id)
    except ValueError as e:
        raise APIError(str(e), 400, param) from None


def _not_found(chunk_id: str) -> APIError:
    return APIError(f"chunk {chunk_id} not found", 404, "chunk_id")


class OpenAIServingChunks:
    """Chunk registration and lookup, for /v1/chunks and for the generation endpoints."""

    def __init__(self, state: ServerState):
        self.state = state
        self.engine = state.engine
        self.registry = state.registry
        self.settings = state.settings
        cfg = self.engine.cfg
        # A tenant's stored bytes are estimated from its chunks' tokens: their KV in the storage
        # dtype, every layer (what one copy takes in a tier).
        self.kv_bytes_per_token = cfg.num_layers * bytes_per_token_per_layer(
            state.settings.kv_storage_dtype, cfg.num_kv_heads, cfg.head_dim)

    # --- used by the generation endpoints --------------------------------------------------

    async def resolve(self, refs: Optional[list[Union[str, ChunkText]]], tenant: Tenant, salt: str) -> ResolvedChunks:
        """Segments for a request's `chunks` (inline texts keyed with the request's `salt`).
        Nothing is written: inline texts are recorded by `record` once their request is
        accepted (their KV is made during its prefill). Raises APIError 400/404/429."""
        if not refs:
            return ResolvedChunks([], [])
        if len(refs) > self.settings.max_chunks_per_request:
            raise APIError(f"too many chunks: {len(refs)} (at most {self.settings.max_chunks_per_request})", 400, "chunks")

        def resolve_all() -> ResolvedChunks:
            segments = [self._resolve_one(ref, f"chunks[{i}]", tenant, salt) for i, ref in enumerate(refs)]
            # Under a cache_salt inline texts stay private to that salt: not registered (so not
            # listed or addressable by ID), their KV only a cache entry, as a turn's.
            inline = [] if salt != tenant.salt else [
                (seg, ref.text) for seg, ref in zip(segments, refs) if isinstance(ref, ChunkText)]
            self.check_room(tenant, [seg for seg, _ in inline])
            return ResolvedChunks(segments, inline)

        return await asyncio.to_thread(resolve_all)

    async def record(self, inline: list[tuple[Segment, str]], tenant: Tenant) -> None:
        """Register inline chunk texts (after their request was accepted)."""
        if inline:
            await asyncio.to_thread(lambda: [self.registry.add(seg.chunk_key, text, seg.token_ids, tenant.name)
                                             for seg, text in inline])

    def _resolve_one(self, ref: Union[str, ChunkText], param: str, tenant: Tenant, salt: str) -> Segment:
        if isinstance(ref, ChunkText):
            return self._prepare(ref.text, param, salt)
        record = self.registry.get(ref)
        if record is None or not visible(record, tenant.name):
            raise APIError(f"chunk {ref} not found; register its text with POST /v1/chunks", 404, "chunks")
        # A chunk ID names its KV: the owner's salt (none if shared), whatever the request's cache_salt.
        segment = self.engine.chunk_segment(tuple(record["token_ids"]), "" if record.get("shared") else tenant.salt)
        if segment.chunk_key != ref:
            raise APIError(f"chunk {ref} was registered for another model or KV format; register its text again",
                           404, "chunks")
        return segment

    def _prepare(self, text: str, param: str, salt: str) -> Segment:
        """Tokenize and check a chunk text (blocking); nothing is written."""
        segment = self.engine.chunk_from_text(text, salt)
        if not segment.token_ids:
            raise APIError("a chunk must not be empty", 400, param)
        if len(segment) > self.settings.max_chunk_tokens:
            raise APIError(f"chunk has {len(segment)} tokens (at most {self.settings.max_chunk_tokens})", 400, param)
        return segment

    def check_room(self, tenant: Tenant, segments: list[Segment]) -> None:
        """APIError 429 if registering `segments` would take `tenant` over its chunk or stored-byte
        limit (blocking). Checked before anything is written; concurrent registrations of one
        tenant may overshoot it by what they add together."""
        max_chunks, max_bytes = tenant.limits.max_chunks, tenant.limits.max_stored_bytes
        if max_chunks is None and max_bytes is None:
            return
        new = {seg.chunk_key: len(seg) for seg in segments if seg.chunk_key not in self.registry}
        chunks, tokens = self.registry.usage(tenant.name)
        if max_chunks is not None and chunks + len(new) > max_chunks:
            raise over_limit(f"tenant {tenant.name} holds {chunks} chunks; {len(new)} more would exceed its limit "
                             f"of {max_chunks} (delete some first)", retry_after_s=STORAGE_RETRY_AFTER_S)
        stored = (tokens + sum(new.values())) * self.kv_bytes_per_token
        if max_bytes is not None and stored > max_bytes:
            raise over_limit(f"tenant {tenant.name} would store {stored} bytes of chunk KV, over its limit of "
                             f"{max_bytes} (delete some chunks first)", retry_after_s=STORAGE_RETRY_AFTER_S)

    # --- /v1/chunks ------------------------------------------------------------------------

    async def create(self, body: ChunkCreateRequest, tenant: Tenant) -> dict:
        """Register one text or several; the KV of each is precomputed on the engine thread."""
        if body.shared and not tenant.admin:
            raise APIError("only an admin key may register shared chunks", 403, "shared")
        if body.texts is not None and len(body.texts) > self.settings.max_chunks_per_request:
            raise APIError(f"too many texts: {len(body.texts)} (at most {self.settings.max_chunks_per_request})",
                           400, "texts")
        salt = "" if body.shared else tenant.salt
        texts = [(body.text, "text")] if body.texts is None else [(t, f"texts[{i}]") for i, t in enumerate(body.texts)]

        def prepare() -> list[Segment]:  # all valid and within the limits first
            segments = [self._prepare(t, param, salt) for t, param in texts]
            self.check_room(tenant, segments)
            return segments

        segments = await asyncio.to_thread(prepare)
        records = await asyncio.to_thread(lambda: [self.registry.add(seg.chunk_key, t, seg.token_ids, tenant.name, body.shared)
                                                   for seg, (t, _) in zip(segments, texts)])
        objects = []
        for segment, record in zip(segments, records):
            # One job per chunk, so decode steps of running requests interleave with them.
            await self.state.async_engine.run_job(lambda s=segment: self.engine.ensure_chunk(s))
            objects.append(_chunk_object(record))
        if body.texts is None:
            return objects[0].model_dump(exclude_none=True)
        return ChunkList(data=objects).model_dump(exclude_none=True)

    async def retrieve(self, chunk_id: str, tenant: Tenant) -> dict:
        _check_id(chunk_id, "chunk_id")
        record = await asyncio.to_thread(self.registry.get, chunk_id)
        if record is None or not visible(record, tenant.name):
            raise _not_found(chunk_id)
        return _chunk_object(record, with_text=True).model_dump(exclude_none=True)

    async def list(self, after: Optional[str], limit: int, tenant: Tenant) -> dict:
        """A page of the tenant's own and the shared chunks in registration order, after the ID `after`."""
        if after is not None:
            _check_id(after, "after")
        try:
            records = await asyncio.to_thread(self.registry.list, after, limit + 1, tenant.name)
        except ValueError as e:
            raise APIError(str(e), 400, "after") from None
        page = ChunkList(data=[_chunk_object(r) for r in records[:limit]], has_more=len(records) > limit)
        return page.model_dump(exclude_none=True)

    async def delete(self, chunk_id: str, tenant: Tenant) -> dict:
        """Forget one of the tenant's chunks: its registry record and its KV in every tier.
        Shared chunks, and KV no record names (a registration that stopped early), only for admins:
        anyone else could probe other tenants' keys with them."""
        _check_id(chunk_id, "chunk_id")

        def remove() -> bool:
            record = self.registry.get(chunk_id)
            if record is None:
                return tenant.admin and self.engine.store.delete(chunk_id)
            if not visible(record, tenant.name):
                return False
            if record.get("shared") and not tenant.admin:
                raise APIError("only an admin key may delete a shared chunk", 403, "chunk_id")
            known = self.registry.delete(chunk_id)
            return self.engine.store.delete(chunk_id) or known

        if not await asyncio.to_thread(remove):
            raise _not_found(chunk_id)
        return ChunkDeleted(id=chunk_id).model_dump()
