"""ASGI middleware of the HTTP server, outside FastAPI's routing: `BodyLimit` (a body over the
limit is a 413) and `RequireAPIKey` (the API's paths need the server's key, else a 401)."""
from __future__ import annotations

import secrets

from starlette.exceptions import HTTPException as StarletteHTTPException

from flexkv.serve.errors import error_response

MAX_BODY_BYTES = 64 << 20   # a request body's bytes, at most (the longest prompt, 4M characters
                            # escaped in JSON, is ~24 MB)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413 with OpenAI's error body, at
    once where its Content-Length says so, else as soon as the bytes read pass the limit (a
    chunked body), so no body is held past it (uvicorn and FastAPI bound none by default)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def _message(self, size: str) -> str:
        return f"The request body is {size}; this server takes at most {self.limit} bytes."

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            response = error_response(413, self._message(f"{int(length)} bytes"),
                                      code="request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:          # FastAPI re-raises it from reading the body
                    raise StarletteHTTPException(413, self._message(f"over {self.limit} bytes"))
            return message
        await self.app(scope, counted, send)


def needs_key(path: str) -> bool:
    """The paths an API key guards: the API's (`/v1` and below, `/tokenize`, `/detokenize`)."""
    return path in ("/v1", "/tokenize", "/detokenize") or path.startswith("/v1/")


class RequireAPIKey:
    """ASGI middleware: every request to the API's paths (`needs_key`) needs `Authorization:
    Bearer <key>` (as OpenAI's API, and vLLM's `--api-key`), else a 401 with OpenAI's error
    body, before anything of the request is read; `/health`, `/metrics` and the docs stay open.
    It wraps neither `receive` nor `send`, so streaming and disconnects are as without it."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    def _allowed(self, scope) -> str | None:
        """None when the request may go on, else why not."""
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or not needs_key(scope["path"]):
            return None
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return ("You didn't provide an API key: this server needs one in an Authorization "
                    "header (Authorization: Bearer YOUR_KEY).")
        if not secrets.compare_digest(token.strip(), self.key):
            return "Incorrect API key provided."
        return None

    async def __call__(self, scope, receive, send):
        why = self._allowed(scope)
        if why is None:
            return await self.app(scope, receive, send)
        response = error_response(401, why, code="invalid_api_key",
                                  headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
