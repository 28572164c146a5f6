"""ASGI middleware of the service: API-key authentication and rate limits before anything else, and a body limit."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .keys import AuthResult
from .routing import ServiceAccess

__all__ = ["DEFAULT_MAX_BODY_BYTES", "KEY_SCOPE", "ApiKeyAuth", "BodySizeLimit"]

DEFAULT_MAX_BODY_BYTES = 64 * 1024

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

KEY_SCOPE = "memguard.api_key"
#: Open without a key: the load balancer's probe, and the static Swagger UI files (the page and schema are not).
_OPEN_PATHS = frozenset({"/healthz"})
_OPEN_PREFIXES = ("/docs/assets/",)


class ApiKeyAuth:
    """ASGI middleware, outermost: 401 without a valid key, 429 over the key's rate limit, before any body is
    read or any work is done. The key reaches the endpoints as ``scope["memguard.api_key"]``.

    ``/healthz`` stays open (load balancers probe it without credentials; it shows the model id and the policies'
    names and versions), and so do Swagger UI's static files; the schema and the ``/docs`` page need a key.
    """

    def __init__(self, app: Any, access: ServiceAccess) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path") or ""
        if scope["type"] != "http" or path in _OPEN_PATHS or path.startswith(_OPEN_PREFIXES):
            await self.app(scope, receive, send)
            return
        authorization = None
        for name, value in scope.get("headers") or ():
            if name == b"authorization":
                authorization = value.decode("latin-1")
                break
        authenticator = self.access.authenticator
        key, token, refused = authenticator.parse(authorization)
        if refused is None:
            assert key is not None
            if not authenticator.cached(key, token):
                refused = await asyncio.get_running_loop().run_in_executor(None, authenticator.verify, key, token)
                refused = None if refused.key is not None else refused
        if refused is None:
            assert key is not None
            wait = await self.access.limiter.acquire(key.id, key.rate_limit)
            if wait:
                refused = AuthResult(None, 429, f"key {key.id!r} is over its rate limit of "
                                                f"{key.rate_limit.describe() if key.rate_limit else ''}; retry in "
                                                f"{wait:.2f} s", wait)
        if refused is not None:
            from ..events import log_event

            log_event("request_refused", level="warning", status=refused.status, path=scope.get("path"),
                      key_id=key.id if key is not None else None, detail=refused.detail)
            await _refuse(send, refused)
            return
        scope[KEY_SCOPE] = key
        await self.app(scope, receive, send)


async def _refuse(send: Any, refused: AuthResult) -> None:
    error = "unauthorized" if refused.status == 401 else "rate_limited"
    payload = json.dumps({"error": error, "detail": refused.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
               (b"connection", b"close")]
    if refused.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="memguard"'))
    else:
        headers.append((b"retry-after", str(max(1, math.ceil(refused.retry_after))).encode()))
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class BodySizeLimit:
    """ASGI middleware: HTTP 413 for bodies over ``max_bytes``, by Content-Length or as actually streamed.

    The body is read (up to the limit) before the app sees it, so a lying or absent Content-Length
    cannot make the app buffer more than the limit.
    """

    def __init__(self, app: Any, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = False
            if too_big:
                await self._reject(send, f"request body of {int(declared)} bytes exceeds {self.max_bytes}")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send, f"request body exceeds {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send: Send, detail: str) -> None:
        payload = json.dumps({"error": "payload_too_large", "detail": detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
