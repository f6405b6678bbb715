"""The gateway's HTTP edge: a request body jetmesh's own edge would refuse never reaches
the A2A SDK's routes.

Every POST/PUT/PATCH body goes through `jetmesh.bus.wire.check_json` (size, UTF-8, lone
surrogates, NaN/Infinity, nesting depth) before the SDK parses it, the same limits as
on the bus. A refused body gets a client error with the reason, and no traceback is
logged: a JSON-RPC parse error (-32700) on a JSON-RPC endpoint (a path ending in `/`),
HTTP 400 on the REST binding.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jetmesh.bus.wire import MAX_MESSAGE_BYTES, WireError, check_json

log = logging.getLogger("jetmesh.gateway")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyCheck:
    """ASGI middleware: read the body (bounded), check it, then hand it on unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, send, f"body over {self.max_bytes} bytes")
                return
            chunks.append(chunk)
            more = bool(message.get("more_body"))
        body = b"".join(chunks)
        if body:
            try:
                check_json(body, max_bytes=self.max_bytes)
            except WireError as e:
                await self._refuse(scope, send, e.reason)
                return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send, reason: str) -> None:
        log.info("refused a request to %s: %s", scope.get("path", "?"), reason)
        path = str(scope.get("path", ""))
        payload: dict[str, Any]
        if path.endswith("/"):  # the JSON-RPC binding
            payload = {"jsonrpc": "2.0", "id": None,
                       "error": {"code": -32700, "message": f"Parse error: {reason}"}}
            status = 200
        else:
            payload = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                 "message": f"invalid request body: {reason}"}}
            status = 400
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
