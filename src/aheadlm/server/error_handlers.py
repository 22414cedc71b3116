"""How errors leave the server: OpenAI-style bodies on `/v1/...`, Ollama's `{"error": "..."}` on
`/api/...`, never a plain-text 500 or FastAPI's `{"detail": ...}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import AheadlmError, ContextLengthError
from .protocol import APIError

log = logging.getLogger(__name__)


def error_response(path: str, err: APIError) -> JSONResponse:
    body = {"error": err.message} if path.startswith("/api/") else err.body()
    return JSONResponse(body, err.status)


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")  # pydantic's wrapper
        if first.get("type") == "json_invalid":
            msg, loc = "request body is not valid JSON", ""
        elif first.get("type") == "missing" and not loc:
            msg = "request body is missing"
        err = APIError(400, f"{loc}: {msg}" if loc else msg, "invalid_request", loc or None)
        return error_response(request.url.path, err)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(AheadlmError)
    async def _aheadlm(request: Request, exc: AheadlmError):
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else "invalid_request"
        return error_response(request.url.path, APIError(400, str(exc), code))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):  # unknown paths, wrong methods
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(request.url.path, APIError(exc.status_code, f"{request.url.path}: {exc.detail}", code))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        err = APIError(500, f"internal error ({type(exc).__name__}: {exc})", "server_error")
        return error_response(request.url.path, err)
