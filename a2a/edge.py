"""The gateway's HTTP edge: a request body jetmesh's own edge would refuse never reaches
the A2A SDK's routes, and what leaves is plain A2A JSON.

Inbound: every POST/PUT/PATCH body goes through `jetmesh.bus.wire.check_json` (size,
UTF-8, lone surrogates, NaN/Infinity, nesting depth) before the SDK parses it, the same
limits as on the bus, and enum fields the SDK's parser would silently turn into
"unspecified" (``ListTasks`` ``status``, a message's ``role``) must name a value. A
refused request gets a client error with the reason, and no traceback is logged: a
JSON-RPC error (-32700 for a body, -32602 for a field) on a JSON-RPC endpoint (a path
ending in `/`), HTTP 400 on the REST binding.

Outbound: numbers that protobuf's ``Struct`` turned into doubles (``32.0``) are integers
again in every JSON body and SSE event; every SSE event carries ``id: <ledger seq>`` (its
``metadata.jetmesh.seq``), so a standard SSE client resumes with ``Last-Event-ID``; and
an error answering a JSON-RPC streaming method is sent as an event stream (one ``event:
error``), as the client asked for one.

`quiet_sdk_logs` turns the SDK's traceback-per-bad-request log records into one line.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import parse_qs

from a2a.types import Role, TaskState
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jetmesh.bus import headers as hn
from jetmesh.bus import tracing
from jetmesh.bus.wire import MAX_MESSAGE_BYTES, WireError, check_json

from .tasks import plain

_CONTENT_TYPE = hn.CONTENT_TYPE.encode()
_CONTENT_LENGTH = hn.CONTENT_LENGTH.encode()

__all__ = ["BodyCheck", "TraceContext", "quiet_sdk_logs", "sse_event_id"]

log = logging.getLogger("jetmesh.gateway")

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_STREAM_METHODS = frozenset({"SendStreamingMessage", "SubscribeToTask"})
_STATES = frozenset(TaskState.keys())
_ROLES = frozenset(Role.keys())
_EVENT_KINDS = ("task", "statusUpdate", "artifactUpdate", "message")
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def _enum_ok(value: Any, names: frozenset[str]) -> bool:
    """What protobuf's JSON parser accepts for an enum: a name, or a known number."""
    if isinstance(value, str):
        return value in names
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names)


def field_errors(method: str | None, params: Any) -> str | None:
    """Why a JSON-RPC request's params are refused before the SDK parses them, or None."""
    if not isinstance(params, dict):
        return None
    if method == "ListTasks" and "status" in params and not _enum_ok(params["status"],
                                                                       _STATES):
        return f"status must be one of {sorted(_STATES)}"
    msg = params.get("message")
    if method in ("SendMessage", "SendStreamingMessage") and isinstance(msg, dict) \
            and "role" in msg and not _enum_ok(msg["role"], _ROLES):
        return f"message.role must be one of {sorted(_ROLES)}"
    return None


def sse_event_id(data: Any) -> int | None:
    """The ledger sequence an SSE event's JSON carries (JSON-RPC or REST form)."""
    if not isinstance(data, dict):
        return None
    body = data.get("result", data)
    if not isinstance(body, dict):
        return None
    for kind in _EVENT_KINDS:
        item = body.get(kind)
        if isinstance(item, dict):
            seq = item.get("metadata", {}).get("jetmesh", {}).get("seq")
            if isinstance(seq, int | float) and not isinstance(seq, bool):
                return int(seq)
    return None


def _rewrite_event(block: bytes) -> bytes:
    """One SSE event with its JSON data made plain and its ``id:`` set."""
    lines = block.splitlines()
    data = [ln[5:].lstrip(b" ") if ln.startswith(b"data:") else None for ln in lines]
    payload = b"\n".join(d for d in data if d is not None)
    if not payload:
        return block
    try:
        obj = plain(json.loads(payload))
    except ValueError:
        return block
    out = [ln for ln, d in zip(lines, data, strict=True) if d is None
           and not ln.startswith(b"id:")]
    seq = sse_event_id(obj)
    if seq is not None:
        out.insert(0, f"id: {seq}".encode())
    out.append(b"data: " + json.dumps(obj, ensure_ascii=False).encode())
    return b"\r\n".join(out)


class Outbound:
    """Wraps `send`: plain numbers in JSON bodies, SSE ids, streaming errors as SSE."""

    def __init__(self, send: Send, *, wants_stream: bool) -> None:
        self.send = send
        self.wants_stream = wants_stream
        self.kind = "other"
        self.start: Message | None = None
        self.buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            ctype = dict(message.get("headers", [])).get(_CONTENT_TYPE, b"")
            if ctype.startswith(b"text/event-stream"):
                self.kind = "sse"
            elif ctype.startswith(b"application/json"):
                self.kind, self.start = "json", message
                return
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.kind == "other":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = bool(message.get("more_body"))
        if self.kind == "json":
            if not more:
                await self._send_json()
            return
        out = []
        while (m := _EVENT_END.search(self.buffer)) is not None:
            out.append(_rewrite_event(self.buffer[:m.start()]) + b"\r\n\r\n")
            self.buffer = self.buffer[m.end():]
        if not more and self.buffer:
            out.append(self.buffer)
            self.buffer = b""
        await self.send({"type": "http.response.body", "body": b"".join(out),
                         "more_body": more})

    async def _send_json(self) -> None:
        assert self.start is not None
        body = self.buffer
        headers = [(k, v) for k, v in self.start.get("headers", [])
                   if k not in (_CONTENT_LENGTH, _CONTENT_TYPE)]
        ctype = b"application/json"
        try:
            obj = plain(json.loads(body)) if body else None
        except ValueError:
            obj = None
        if obj is not None:
            body = json.dumps(obj, ensure_ascii=False).encode()
            if self.wants_stream and isinstance(obj, dict) and "error" in obj:
                body = b"event: error\r\ndata: " + body + b"\r\n\r\n"
                ctype = b"text/event-stream"
        start = {**self.start, "headers": [*headers, (_CONTENT_TYPE, ctype),
                                           (_CONTENT_LENGTH, str(len(body)).encode())]}
        await self.send(start)
        await self.send({"type": "http.response.body", "body": body})


class _QuietClientErrors(logging.Filter):
    """The SDK logs `logger.exception` for a request that does not parse: one line."""

    CLIENT_ERRORS = ("Failed to parse request params", "Failed to validate base JSON-RPC",
                     "Error sending push-notification")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and str(record.msg).startswith(self.CLIENT_ERRORS):
            exc = record.exc_info[1]
            record.msg = f"refused a request: {record.getMessage()}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_QUIET = _QuietClientErrors()


def quiet_sdk_logs() -> None:
    """Install the one-line filter on the SDK's route loggers (idempotent)."""
    for name in ("a2a.server.routes.jsonrpc_dispatcher", "a2a.server.routes.rest_dispatcher",
                 "a2a.utils.error_handlers", "a2a.server.tasks.base_push_notification_sender"):
        lg = logging.getLogger(name)
        if _QUIET not in lg.filters:
            lg.addFilter(_QUIET)


class TraceContext:
    """ASGI middleware: each request runs in the caller's trace context (its W3C
    `traceparent` header), so a task it submits continues the caller's trace; an A2A call
    (a POST) is also a live SERVER span of the gateway there when live spans are on
    (`jetmesh.bus.tracing`), and the task's trace then hangs under that span."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers") or []}
        caller = headers.get(hn.TRACEPARENT)
        if scope.get("method") != "POST":
            with tracing.attached(caller):
                await self.app(scope, receive, send)
            return
        path = str(scope.get("path") or "/")
        status: dict[str, int] = {}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        with tracing.live_span(f"POST {path}", parent=caller, kind=SpanKind.SERVER,
                               attributes={"http.request.method": "POST", "url.path": path,
                                           "jetmesh.component": "gateway"}) as span:
            await self.app(scope, receive, send_status)
            if "code" in status:
                span.set_attribute("http.response.status_code", status["code"])


class BodyCheck:
    """ASGI middleware: read the body (bounded), check it, then hand it on unchanged."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") not in _BODY_METHODS:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            if str(scope.get("path", "")).endswith("/tasks") and "status" in query \
                    and not all(v in _STATES for v in query["status"]):
                await self._refuse(scope, send, f"status must be one of {sorted(_STATES)}",
                                   field=True)
                return
            await self.app(scope, receive, Outbound(send, wants_stream=False))
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
        wants_stream = False
        if body:
            try:
                check_json(body, max_bytes=self.max_bytes)
            except WireError as e:
                await self._refuse(scope, send, e.reason)
                return
            try:
                req = json.loads(body)
            except ValueError:
                req = None  # not JSON: the SDK answers its parse error
            if isinstance(req, dict) and str(scope.get("path", "")).endswith("/"):
                method = req.get("method")
                wants_stream = method in _STREAM_METHODS
                why = field_errors(method if isinstance(method, str) else None,
                                   req.get("params"))
                if why:
                    await self._refuse(scope, send, why, field=True, rpc_id=req.get("id"),
                                       stream=wants_stream)
                    return
            elif isinstance(req, dict):
                why = field_errors("SendMessage" if str(scope.get("path", "")).endswith(
                    ("message:send", "message:stream")) else None, req)
                if why:
                    await self._refuse(scope, send, why, field=True)
                    return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, Outbound(send, wants_stream=wants_stream))

    async def _refuse(self, scope: Scope, send: Send, reason: str, *, field: bool = False,
                      rpc_id: Any = None, stream: bool = False) -> None:
        log.info("refused a request to %s: %s", scope.get("path", "?"), reason)
        path = str(scope.get("path", ""))
        payload: dict[str, Any]
        if path.endswith("/"):  # the JSON-RPC binding
            if not isinstance(rpc_id, str | int) or isinstance(rpc_id, bool):
                rpc_id = None
            error = ({"code": -32602, "message": f"Invalid params: {reason}"} if field
                     else {"code": -32700, "message": f"Parse error: {reason}"})
            payload = {"jsonrpc": "2.0", "id": rpc_id, "error": error}
            status = 200
        else:
            payload = {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                 "message": f"invalid request{'' if field else ' body'}: "
                                            f"{reason}"}}
            status = 400
        body = json.dumps(payload).encode()
        ctype = b"application/json"
        if stream:
            body, ctype = b"event: error\r\ndata: " + body + b"\r\n\r\n", b"text/event-stream"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(_CONTENT_TYPE, ctype),
                                (_CONTENT_LENGTH, str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
