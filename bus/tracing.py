"""Live trace context in the processes that do a task's work: workers, the memory service.

The telemetry role derives a task's trace from the ledger alone (`orchestrator.telemetry`);
this module lets the processes that do the work join that trace while they do it:

* `attached(traceparent)` makes a W3C context current (OpenTelemetry's context API, so any
  OpenTelemetry instrumentation a user adds sees it too). A worker attaches the context of
  its step attempt's `invoke_agent` span, whose id the telemetry role derives the same way
  (`tracecontext.agent_traceparent`), for the whole step.
* `inject(headers)` writes the current context into a NATS message's or an HTTP request's
  headers: memory requests, model API calls, A2A calls and MCP calls carry `traceparent`.
* `traced(client)` hooks an httpx (or httpx2, which the anthropic, openai and mcp SDKs
  use) client: it injects the context into every request and, when live spans are on,
  records a CLIENT span per request under the step's span.
* `live_span(name, ...)` records a span of the process's own work (a memory search).

Live spans are exported only when the process is configured for OTLP by the standard
variables (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and
`OTEL_TRACES_EXPORTER` not `none`, `OTEL_SDK_DISABLED` not true) and `JETMESH_LIVE_SPANS`
is not `0`. Otherwise spans are non-recording: the context still travels, nothing is sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any, Protocol, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from jetmesh.bus import headers as hn
from jetmesh.bus.tracecontext import parse_traceparent

__all__ = [
    "attached",
    "current_traceparent",
    "inject",
    "live_span",
    "live_spans_wanted",
    "shutdown_live_spans",
    "traced",
]

log = logging.getLogger(__name__)


class _HookedClient(Protocol):
    event_hooks: Any


C = TypeVar("C", bound=_HookedClient)

SCOPE = "jetmesh.live"
"""The instrumentation scope of live spans (the ledger-derived ones are `jetmesh`)."""

_lock = threading.Lock()
_provider: Any = None
_tracer: trace.Tracer | None = None


def live_spans_wanted(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process records and exports live spans (see the module docstring)."""
    env = os.environ if env is None else env
    if env.get("JETMESH_LIVE_SPANS", "").strip() == "0":
        return False
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")[0].strip().lower() != "otlp":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _live_tracer() -> trace.Tracer:
    """The tracer for live spans: a batch-exporting SDK tracer when live spans are wanted,
    else the API's no-op tracer (non-recording spans that still carry the context).
    Made once per process; a private provider, so the process's global one is untouched."""
    global _provider, _tracer
    if _tracer is not None:
        return _tracer
    with _lock:
        if _tracer is not None:
            return _tracer
        if not live_spans_wanted():
            _tracer = trace.NoOpTracer()
            return _tracer
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create({"service.name": os.environ.get(
            "OTEL_SERVICE_NAME", "jetmesh-worker")})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _provider = provider
        _tracer = provider.get_tracer(SCOPE)
        return _tracer


def shutdown_live_spans() -> None:
    """Flush and stop the live-span exporter (a process's shutdown). Idempotent."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        with contextlib.suppress(Exception):
            provider.shutdown()


@contextlib.contextmanager
def attached(traceparent: str | None) -> Iterator[None]:
    """Make `traceparent` the current context for the block (and the tasks it starts).
    A missing or invalid one leaves the current context as it is."""
    if parse_traceparent(traceparent) is None:
        yield
        return
    token = otel_context.attach(propagate.extract({hn.TRACEPARENT: str(traceparent)}))
    try:
        yield
    finally:
        otel_context.detach(token)


def current_traceparent() -> str | None:
    """The current context as a W3C traceparent, if there is one."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get(hn.TRACEPARENT)


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current context (`traceparent`, `tracestate`) into `headers`; returns
    them. Nothing is written when no context is current."""
    propagate.inject(headers)
    return headers


@contextlib.contextmanager
def live_span(name: str, *, parent: str | None = None, kind: SpanKind = SpanKind.INTERNAL,
              attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span]:
    """A live span of this process's own work, under `parent` (a traceparent from a
    message's headers) or the current context. Errors mark it failed and propagate."""
    with attached(parent):
        span_cm = _live_tracer().start_as_current_span(
            name, kind=kind, attributes=dict(attributes or {}),
            record_exception=True, set_status_on_exception=True)
        with span_cm as span:
            yield span


_SPAN_KEY = "jetmesh.live_span"


async def _on_request(request: Any) -> None:
    url = request.url
    attrs: dict[str, Any] = {"http.request.method": request.method,
                             "server.address": url.host,
                             "url.full": str(url.copy_with(query=None, fragment=None))}
    if url.port:
        attrs["server.port"] = url.port
    span = _live_tracer().start_span(request.method, kind=SpanKind.CLIENT, attributes=attrs)
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    for key, value in carrier.items():
        request.headers[key] = value
    request.extensions[_SPAN_KEY] = span


async def _on_response(response: Any) -> None:
    span = response.request.extensions.pop(_SPAN_KEY, None)
    if span is None:
        return
    status = int(response.status_code)
    span.set_attribute("http.response.status_code", status)
    if status >= 400:
        span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
    span.end()


def traced(client: C) -> C:
    """`client` (an httpx or httpx2 AsyncClient: the anthropic, openai and mcp SDKs use
    httpx2, the a2a-sdk httpx) with the trace context on every request and, with live
    spans on, a CLIENT span per request (method, server, status) under the current
    context. Event hooks: a request that fails before any response leaves its span
    unended (not exported), and the error is the caller's to record."""
    hooks = client.event_hooks
    if _on_request not in hooks["request"]:
        client.event_hooks = {"request": [*hooks["request"], _on_request],
                              "response": [*hooks["response"], _on_response]}
    return client
