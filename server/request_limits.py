"""Request-size limit and bearer-token auth, as plain ASGI middleware (ahead of routing and parsing).

- Bodies over `max_body_bytes` get 413 before anything parses them (declared by Content-Length or
  found while reading a chunked body).
- With an API key set, `/v1/...` needs `Authorization: Bearer KEY` (or `?access_token=KEY` for the
  WebSocket and SSE endpoints, which browsers cannot give headers); the page, health checks, docs
  and metrics stay open.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


async def send_json_error(send: Send, status: int, code: str, message: str,
                          headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max
            except ValueError:
                await send_json_error(send, 400, "invalid_request", "Content-Length is not a number")
                return
            if too_big:
                await self._refuse(send)
                return
        # Read the body here (bounded), then replay it to the app.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max:
                await self._refuse(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        await send_json_error(send, 413, "body_too_large", f"request bodies are limited to {self.max} bytes")


class BearerAuth:
    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        guarded = scope["type"] in ("http", "websocket") and scope["path"].startswith("/v1/")
        if self.key is None or not guarded:
            await self.app(scope, receive, send)
            return
        token = self._token(scope)
        if token is not None and hmac.compare_digest(token, self.key):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": "unauthorized"})
            return
        await send_json_error(send, 401, "unauthorized", "missing or wrong bearer token",
                              [(b"www-authenticate", b'Bearer realm="rollcast"')])

    @staticmethod
    def _token(scope: Scope) -> bytes | None:
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            return auth[7:].strip()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        token = query.get("access_token")
        return token[0].encode() if token else None
