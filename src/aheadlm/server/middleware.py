"""ASGI middleware in front of the API: a body size limit (413) and JSON bodies whatever their
declared content type."""

from __future__ import annotations

import json

from .protocol import APIError


class JsonBodies:
    """Every POST body is JSON here. Ollama's own examples use `curl -d`, which declares a form, and
    FastAPI would then refuse the body as "not a dictionary": declare it JSON instead."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        return await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: 413 for request bodies over the limit (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _send_json(send, 413, APIError(413, f"request body over {self.limit} bytes").body())
        if declared is not None:
            return await self.app(scope, receive, send)
        # A streamed (chunked) body: read it all first, so an oversized one gets the same 413
        # rather than a parse error from inside the handler.
        chunks, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await _send_json(send, 413, APIError(413, f"request body over {self.limit} bytes").body())
            if not msg.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: wait for the disconnect, as Starlette expects
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})
