"""Pure-ASGI middleware: the API key check (which tenant a request is for) and the body limit.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so streamed responses and client-disconnect
detection pass through untouched.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import APIError
from server.tenants import TenantTable


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((value for key, value in scope["headers"] if key == name), None)


# The API and its description; /health and /metrics stay public (probes and scrapers).
PROTECTED = ("/v1", "/docs", "/redoc", "/openapi.json")


class TenantMiddleware:
    """Require `Authorization: Bearer <key>` with a key of the table on the API and its docs,
    and put the key's tenant into the request state (`request.state.tenant`). An open table
    (no keys configured) lets every request in as tenant "default"."""

    def __init__(self, app: ASGIApp, tenants: TenantTable):
        self.app = app
        self.tenants = tenants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED):
            tenant = self.tenants.default
            if not self.tenants.open:
                given = (_header(scope, b"authorization") or b"").decode("latin-1")
                scheme, _, key = given.partition(" ")
                tenant = self.tenants.lookup(key) if scheme == "Bearer" and key else None
            if tenant is None:
                error = APIError("invalid or missing API key", 401, headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send)
                return
            scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413, by Content-Length and by the bytes actually
    received. The body is read here and replayed to the app; later `receive` calls go to the
    client connection (so disconnects are still seen)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        buffered: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(f"request body too large (at most {self.max_bytes} bytes)", 413)
        await error.response()(scope, receive, send)
