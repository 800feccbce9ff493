"""The HTTP app: thin routes over the serving classes, and the server's lifecycle.

Lifecycle: the app starts answering at once while the model loads in the background (/health
is 503 until it is loaded); on shutdown it stops taking requests, lets running ones finish
(bounded), aborts the rest, stops the engine thread and closes the store (flushing it).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import Response

from config.settings import Settings
from engine.llm_engine import LLMEngine
from server.errors import APIError, install_error_handlers
from server.middleware import BodyLimitMiddleware, TenantMiddleware
from server.protocol import ChatCompletionRequest, ChunkCreateRequest, CompletionRequest, ModelCard, ModelList
from server.protocol_documents import DocumentAnalyzeRequest, DocumentCreateRequest
from server.serving_chat import OpenAIServingChat
from server.serving_chunks import OpenAIServingChunks
from server.serving_completion import OpenAIServingCompletion
from server.serving_documents import OpenAIServingDocuments
from server.serving_engine import cancel_on_disconnect
from server.state import ServerState, load_state
from server.tenants import InFlight, Slot, Tenant, TenantTable

log = logging.getLogger(__name__)

# After the HTTP server has drained its connections: how long running requests may still take.
ENGINE_DRAIN_S = 5.0


@dataclass
class Serving:
    """The loaded state and the serving classes over it."""
    state: ServerState
    chunks: OpenAIServingChunks
    chat: OpenAIServingChat
    completion: OpenAIServingCompletion
    documents: OpenAIServingDocuments
    in_flight: InFlight

    @classmethod
    def over(cls, state: ServerState) -> "Serving":
        chunks = OpenAIServingChunks(state)
        chat = OpenAIServingChat(state, chunks)
        in_flight = InFlight(on_limited=lambda tenant: state.metrics.observe_tenant(tenant, "limited"))
        return cls(state, chunks, chat, OpenAIServingCompletion(state, chunks), OpenAIServingDocuments(state, chat),
                   in_flight)


class Runtime:
    """The server's lifecycle: loading (in the background), serving, failed, or draining."""

    def __init__(self, settings: Settings, engine: Optional[LLMEngine], on_fatal: Optional[Callable[[], None]]):
        self.settings = settings
        self._engine = engine
        self._on_fatal = on_fatal
        self.serving: Optional[Serving] = None
        self.load_error: Optional[str] = None
        self.draining = False

    async def load(self) -> None:
        try:
            state = await asyncio.to_thread(load_state, self.settings, asyncio.get_running_loop(), self._engine)
        except Exception as e:
            log.exception("could not load the model")
            self.load_error = f"{type(e).__name__}: {e}"
            if self._on_fatal is not None:
                self._on_fatal()
            return
        self.serving = Serving.over(state)

    async def shutdown(self, loader: asyncio.Task) -> None:
        self.draining = True
        await loader  # a load in progress cannot be interrupted; let it end first
        if self.serving is not None:
            await self.serving.state.async_engine.shutdown(ENGINE_DRAIN_S)
            await asyncio.to_thread(self.serving.state.close)
            log.info("chunk store flushed and closed")  # operators (and the deploy test) look for it

    def ready(self) -> Serving:
        """The serving classes; APIError 503 while loading, after a failed load, or draining."""
        if self.draining:
            reason = "the server is shutting down"
        elif self.load_error is not None:
            reason = f"the model failed to load: {self.load_error}"
        elif self.serving is None:
            reason = "the model is loading"
        else:
            return self.serving
        raise APIError(reason, 503, headers={"Retry-After": "5"})


def tenant_of(request: Request) -> Tenant:
    """The tenant TenantMiddleware found for the request's API key."""
    return request.state.tenant


def build_app(settings: Settings, engine: Optional[LLMEngine] = None,
              on_fatal: Optional[Callable[[], None]] = None) -> FastAPI:
    """The server app. `engine` (already loaded, with its store) is used instead of loading one
    from `settings`; `on_fatal` is called if loading fails (the CLI stops the server).
    `app.state.tenants` is the key table (the CLI reloads it on SIGHUP); a bad keys file raises."""
    rt = Runtime(settings, engine, on_fatal)
    tenants = TenantTable.from_settings(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loader = asyncio.create_task(rt.load())
        try:
            yield
        finally:
            await rt.shutdown(loader)

    docs = {} if settings.api_docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="CacheBlend", lifespan=lifespan, **docs)
    app.state.runtime = rt
    app.state.tenants = tenants
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(TenantMiddleware, tenants=tenants)  # outermost: the key is checked first

    def slot(tenant: Tenant) -> Slot:
        """One request in flight for the tenant (429 over its limit). Taken in the route body, not
        as a dependency: a request whose body fails validation never reaches the `with` that frees it."""
        return rt.ready().in_flight.slot(tenant)

    @app.get("/health")
    async def health() -> dict:
        state = rt.ready().state
        queue = state.async_engine
        if not queue.alive:
            raise APIError("the engine has stopped", 503)
        return {"status": "ok", "model": state.model_name, "num_running": queue.num_running,
                "num_waiting": queue.num_waiting}

    @app.get("/metrics")
    async def metrics() -> Response:
        state = rt.ready().state
        m = state.metrics
        m.observe_store(await asyncio.to_thread(state.engine.store.stats))
        m.set_queue(state.async_engine.num_running, state.async_engine.num_waiting)
        m.set_ratio(state.engine.recompute_ratio)
        body, content_type = m.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models")
    async def models() -> dict:
        state = rt.ready().state
        card = ModelCard(id=state.model_name, root=state.model_name, max_model_len=state.engine.max_model_len)
        return ModelList(data=[card]).model_dump()

    # Generation and analysis hold a slot of the tenant's requests in flight: released when the
    # route returns, or for a streamed response when the stream ends.
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request,
                               tenant: Tenant = Depends(tenant_of)):
        with slot(tenant) as held:
            return await cancel_on_disconnect(rt.ready().chat.create_chat_completion(body, tenant, held), raw_request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw_request: Request,
                          tenant: Tenant = Depends(tenant_of)):
        with slot(tenant) as held:
            return await cancel_on_disconnect(rt.ready().completion.create_completion(body, tenant, held), raw_request)

    @app.post("/v1/chunks")
    async def create_chunks(body: ChunkCreateRequest, tenant: Tenant = Depends(tenant_of)) -> dict:
        return await rt.ready().chunks.create(body, tenant)

    @app.get("/v1/chunks")
    async def list_chunks(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                          tenant: Tenant = Depends(tenant_of)) -> dict:
        return await rt.ready().chunks.list(after, limit, tenant)

    @app.get("/v1/chunks/{chunk_id}")
    async def retrieve_chunk(chunk_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        return await rt.ready().chunks.retrieve(chunk_id, tenant)

    @app.delete("/v1/chunks/{chunk_id}")
    async def delete_chunk(chunk_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        return await rt.ready().chunks.delete(chunk_id, tenant)

    # Registration and analysis are cancelled with their client: a registration then leaves
    # nothing behind (a streamed one notices when its progress stream is cut).
    @app.post("/v1/documents")
    async def create_document(body: DocumentCreateRequest, raw_request: Request, tenant: Tenant = Depends(tenant_of)):
        return await cancel_on_disconnect(rt.ready().documents.create(body, tenant), raw_request)

    @app.get("/v1/documents")
    async def list_documents(after: Optional[str] = None, limit: int = Query(20, ge=1, le=100),
                             tenant: Tenant = Depends(tenant_of)) -> dict:
        return await rt.ready().documents.list(after, limit, tenant)

    @app.get("/v1/documents/{document_id}")
    async def retrieve_document(document_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        return await rt.ready().documents.retrieve(document_id, tenant)

    @app.delete("/v1/documents/{document_id}")
    async def delete_document(document_id: str, tenant: Tenant = Depends(tenant_of)) -> dict:
        return await rt.ready().documents.delete(document_id, tenant)

    @app.post("/v1/documents/{document_id}/analyze")
    async def analyze_document(document_id: str, body: DocumentAnalyzeRequest, raw_request: Request,
                               tenant: Tenant = Depends(tenant_of)):
        with slot(tenant) as held:
            return await cancel_on_disconnect(rt.ready().documents.analyze(document_id, body, tenant, held), raw_request)

    return app
