"""Errors in vLLM's shape: `{"error": {"message", "type", "param", "code"}}` with the HTTP status.

`APIError` is raised anywhere below a route and rendered by the handlers installed with
`install_error_handlers`; validation errors become 400 (not FastAPI's 422) with `param` taken
from the field path, e.g. `messages[0].content`.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# The OpenAI client's exception class names, by status.
_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """An error reported to the client with `status`; never fatal to the server."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.status, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, status: int, param: Optional[str] = None) -> dict:
    error_type = _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
    return {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def field_path(loc: Sequence[Union[str, int]]) -> Optional[str]:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; None for the body itself."""
    path = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path or None


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(f"Invalid JSON in the request body: {detail}".rstrip(": ")).response()
    param = field_path(first.get("loc", ()))
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return APIError(f"{param}: {message}" if param else message, 400, param).response()


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return APIError(str(exc.detail), exc.status_code, headers=exc.headers).response()


def _unexpected_error(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return APIError("internal server error", 500).response()


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, lambda _, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
