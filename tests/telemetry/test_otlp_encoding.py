"""The telemetry role's own OTLP encoding (orchestrator.otlp) against the SDK's encoder:
the same spans parse, with the OTLP protocol's own classes, into the same request."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource

from jetmesh.bus import events as ev
from jetmesh.bus.ledger import LedgerEntry, subject_for
from jetmesh.orchestrator import otlp
from jetmesh.orchestrator.telemetry import build_spans, derive, encode_traces, http_client

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(s: float) -> datetime:
    return T0 + timedelta(seconds=s)


def task(tid: str, *, traceparent: str | None = None, fail: bool = False
         ) -> list[LedgerEntry]:
    """A one-step task with a model call (fallbacks, cache reads), a tool call, policy and
    policy event and a retry: most span shapes."""
    events: list[ev.Event] = [
        ev.TaskSubmitted(subject=tid, time=at(0), traceparent=traceparent,
                         data=ev.TaskSubmittedData(workflow="w", goal="the goal")),
        ev.TaskPlanned(subject=tid, time=at(0.1), data=ev.TaskPlannedData(
            planner="workflow:w", steps=[ev.PlanStep(id="s1", skill="refund")])),
        ev.StepDispatched(subject=tid, time=at(0.2), data=ev.StepDispatchedData(
            step_id="s1", skill="refund", input={})),
        ev.StepDispatched(subject=tid, time=at(0.25), data=ev.StepDispatchedData(
            step_id="s1", skill="refund", input={}, attempt=2)),
        ev.StepStarted(subject=tid, time=at(0.3), data=ev.StepStartedData(
            step_id="s1", agent="billing", worker="w1", claim=False)),
        ev.ModelCalled(subject=tid, time=at(0.4), data=ev.ModelCalledData(
            step_id="s1", agent="billing", worker="w1", provider="anthropic",
            model="claude-x", input_tokens=120, output_tokens=30, cost_usd=0.0012,
            latency_ms=80.5, response={
                "text": "ünïcode ✓", "stop_reason": "tool_use", "model": "claude-x-1",
                "raw": {"id": "msg_1", "usage": {"cache_read_input_tokens": 64}},
                "tool_calls": [{"id": "c1", "name": "refund", "arguments": {"n": 1}}],
                "fallbacks": [{"provider": "openai", "model": "gpt-y", "error": "429",
                               "breaker": "model:openai", "breaker_state": "open",
                               "skipped": False}]})),
        ev.PolicyDecided(subject=tid, time=at(0.45), data=ev.PolicyDecidedData(
            step_id="s1", agent="billing", tool="refund", args_hash="h1",
            decision="approve", rule="refund-over-10", reason="over the limit")),
        ev.ToolCalled(subject=tid, time=at(0.5), data=ev.ToolCalledData(
            step_id="s1", agent="billing", worker="w1", tool="refund", call_id="c1",
            side_effects=True, idempotency_key="k1", latency_ms=100,
            arguments={"amount": 5}, output={"ok": True})),
        ev.StepCompleted(subject=tid, time=at(0.6), data=ev.StepCompletedData(
            step_id="s1", agent="billing", worker="w1", output={"ok": True})),
    ]
    if fail:
        events.append(ev.TaskFailed(subject=tid, time=at(0.7), data=ev.TaskFailedData(
            code="step_failed", reason="s1 failed")))
    else:
        events.append(ev.TaskCompleted(subject=tid, time=at(0.7),
                                       data=ev.TaskCompletedData(result={})))
    return [LedgerEntry(i + 1, subject_for(e), e) for i, e in enumerate(events)]


def parsed(data: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    return req


def test_direct_encoding_parses_into_the_sdk_encoders_request() -> None:
    resource = Resource({"service.name": "jetmesh-test", "k8s.pod.name": "p-1",
                         "replicas": 3, "ratio": 0.5, "flag": True})
    tasks = {"enc-a": task("enc-a"),
             "enc-b": task("enc-b", fail=True,
                           traceparent="00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"),
             "enc-c": task("enc-c")}
    for capture in (False, True):
        spans = [s for t, e in tasks.items()
                 for s in build_spans(t, e, resource=resource, capture=capture)]
        traces = [derive(t, e, capture=capture) for t, e in tasks.items()]
        assert all(t is not None for t in traces)
        sdk = parsed(encode_spans(spans).SerializeToString())
        ours = parsed(encode_traces([t for t in traces if t], resource))
        assert ours == sdk
        got = ours.resource_spans[0].scope_spans[0].spans
        assert len(got) == len(spans) == 3 * 5  # root, plan, invoke_agent, chat, tool
        remote = [s for s in got if s.flags & otlp.FLAG_IS_REMOTE]
        assert [s.parent_span_id.hex() for s in remote] == ["cd" * 8]


def test_values_the_sdk_refuses_drop_their_key_as_the_sdk_does() -> None:
    attrs = {"ok": "x", "none": None, "big": 1 << 70, "neg": -5, "seq": ["a", None, 2],
             "map": {"k": 1}, "obj": object(), "empty": "", "f": False}
    one = otlp.attributes(b"\x4a", attrs)
    req = parsed(otlp.request(b"", "", otlp.scope_bytes("s", None), "", [otlp.span(
        b"\x01" * 16, b"\x02" * 8, None, False, "n", otlp.KIND_INTERNAL, 1, 2, attrs, [],
        otlp.STATUS_UNSET, None)]))
    kept = {kv.key for kv in req.resource_spans[0].scope_spans[0].spans[0].attributes}
    assert kept == {"ok", "none", "neg", "seq", "map", "empty", "f"}
    assert otlp.attributes(b"\x4a", attrs) == one  # the cached fields are the same bytes


def test_the_otlp_http_exporter_takes_encoded_requests() -> None:
    """The fast path (encoded here, sent by the exporter's client) exists in the installed
    exporter: without it every request would go through the SDK's encoder."""
    exporter = OTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    try:
        assert http_client(exporter) is not None
    finally:
        exporter.shutdown()
    assert http_client(exporter) is None  # shut down: not used
