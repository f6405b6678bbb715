"""Trace context beyond the ledger: a worker's model calls and memory requests carry the
context of its step attempt's `invoke_agent` span, and live spans (the model HTTP calls,
the memory service's handling) nest under the spans the telemetry role derives."""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jetmesh.agents.models.openai import OpenAIModel
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.models.types import Message, ModelRequest, ModelResponse
from jetmesh.bus import subjects, tracing
from jetmesh.bus.connection import connect
from jetmesh.bus.tracecontext import agent_traceparent, task_traceparent
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.telemetry import task_trace_id

sys.path.insert(0, str(Path(__file__).parents[1] / "models"))
from model_fakes import serve_fake

ORDERS = ["A1001", "A1002", "A1003"]
CLIENT, SERVER = 3, 2  # OTLP span kinds


def completion(text: str = "ok") -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1_700_000_000,
            "model": "gpt-test",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class ViaHttp:
    """The scripted model's answers (agent logic), each after a real call through the
    OpenAI SDK to a local server speaking its wire format (the HTTP wiring)."""

    def __init__(self, http: OpenAIModel) -> None:
        self.http, self.sim = http, SimModel()
        self.provider, self.name = self.sim.provider, self.sim.name

    async def complete(self, request: ModelRequest) -> ModelResponse:
        await self.http.complete(ModelRequest(messages=[Message(role="user", content="hi")],
                                              max_tokens=5))
        return await self.sim.complete(request)

    async def aclose(self) -> None:
        await self.http.aclose()


@pytest.fixture
def live_spans(receiver, monkeypatch) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Live spans of this process on, to the test's receiver (made anew from the env)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "jetmesh-test")
    tracing.shutdown_live_spans()
    yield
    tracing.shutdown_live_spans()


async def test_model_calls_carry_the_step_context_and_nest_under_its_agent_span(
        make_mesh, telemetry, receiver, live_spans) -> None:
    with serve_fake() as fake:
        fake.enqueue(200, completion(), times=6)
        http = OpenAIModel("gpt-test", api_key="k", base_url=fake.url + "/v1")
        mesh = await make_mesh(["support"], worker_model=ViaHttp(http))
        tid = await mesh.client.submit("status of my orders", workflow="fanout",
                                       input={"order_ids": ORDERS})
        state = await mesh.client.result(tid, timeout=30)
        assert state.status is TaskStatus.COMPLETED, state.reason
        sent = [r.headers.get("traceparent") for r in fake.requests]
        await http.aclose()
    trace_id = f"{task_trace_id(tid, None):032x}"
    await receiver.wait_for(lambda spans: any(s["trace_id"] == trace_id and s["name"]
                                              .startswith("invoke_workflow") for s in spans))
    tracing.shutdown_live_spans()  # flush the worker's batch of live spans
    live = await receiver.wait_for(lambda spans: len(got := [
        s for s in spans if s["trace_id"] == trace_id and s["scope"] == tracing.SCOPE]) >= 6
        and got, what="the 6 live HTTP spans")
    spans = receiver.trace(trace_id)
    agents = {s["span_id"]: s for s in spans if s["name"].startswith("invoke_agent")}
    assert len(agents) == 3 and len(live) == 6
    assert all(s["name"] == "POST" and s["kind"] == CLIENT for s in live)
    assert all(s["attributes"]["http.response.status_code"] == 200 for s in live)
    # Each model call is a child of the worker's own invoke_agent span, 2 per step...
    assert Counter(s["parent_span_id"] for s in live) == {a: 2 for a in agents}
    # ... the one the worker derived from its StepStarted event, as the telemetry role did.
    started = [e.event for e in (await mesh.orchestrator.ledger.read(tid))
               if e.event.type == "jetmesh.step.started.v1"]
    root_tp = task_traceparent(tid, None)
    assert {str(agent_traceparent(root_tp, e.id)).split("-")[2] for e in started} == set(agents)
    # The vendor's server saw each live span as the caller (W3C traceparent header).
    assert all(tp is not None for tp in sent)
    assert {tp.split("-")[1] for tp in sent if tp} == {trace_id}
    assert {tp.split("-")[2] for tp in sent if tp} == {s["span_id"] for s in live}


async def test_memory_requests_carry_the_callers_context_and_the_service_spans_under_it(
        bus, receiver, live_spans, tmp_path) -> None:
    store = await MemoryStore.open(MemorySettings(data_dir=tmp_path / "data",
                                                  embedder="hash", hash_dims=64))
    service = MemoryService(bus.nc, bus.js, store, episodes=False)
    await service.start()
    nc = await connect(bus.url)
    seen: list[dict[str, str]] = []

    async def spy(msg: Any) -> None:
        seen.append(dict(msg.headers or {}))

    sub = await nc.subscribe(subjects.memory("search"), cb=spy)  # a listener, no reply
    try:
        trace_id, caller = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        tp = f"00-{trace_id}-{caller}-01"
        client = MemoryClient(nc)
        with tracing.attached(tp):
            await client.search("anything", user_id=f"u-{uuid.uuid4().hex[:6]}")
        await client.search("outside any trace", user_id="nobody")
        tracing.shutdown_live_spans()
        spans = await receiver.wait_for(
            lambda s: [x for x in s if x["trace_id"] == trace_id], what="the memory span")
        assert len(spans) == 1
        span = spans[0]
        assert span["name"] == "memory search" and span["kind"] == SERVER
        assert span["parent_span_id"] == caller  # under the caller's span
        assert span["attributes"]["jetmesh.memory.operation"] == "search"
        assert [h.get("traceparent") for h in seen] == [tp, None]
    finally:
        await sub.unsubscribe()
        await nc.close()
        await service.stop()
        await store.close()


async def test_fallbacks_and_breaker_trips_are_events_on_the_chat_spans(make_mesh, telemetry,
                                                                         receiver) -> None:
    from jetmesh.agents.models import (
        BreakerModel,
        CircuitBreaker,
        FallbackChain,
        FunctionModel,
        ModelTransientError,
    )

    def down(request: ModelRequest) -> str:
        raise ModelTransientError("anthropic", "claude-x", "HTTP 529: overloaded", status=529)

    breaker = CircuitBreaker(f"anthropic-{uuid.uuid4().hex[:6]}", failure_threshold=1,
                             reset_timeout_s=600)
    chain = FallbackChain([BreakerModel(FunctionModel(down, provider="anthropic",
                                                      name="claude-x"), breaker), SimModel()])
    mesh = await make_mesh(["support"], worker_model=chain)
    tid = await mesh.client.submit("status of my orders", workflow="fanout",
                                   input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    trace_id = f"{task_trace_id(tid, None):032x}"
    await receiver.wait_for(lambda spans: any(s["trace_id"] == trace_id and s["name"]
                                              .startswith("invoke_workflow") for s in spans))
    chats = [s for s in receiver.trace(trace_id) if s["name"].startswith("chat ")
             and s["attributes"].get("jetmesh.purpose") == "step"]
    assert len(chats) == 6
    # Every step call fell back; the first failure tripped the breaker, later calls found
    # it open and skipped the primary without calling it.
    assert all("jetmesh.model.fallback" in s["events"] for s in chats)
    assert sum("jetmesh.breaker.tripped" in s["events"] for s in chats) == 1
    assert sum("jetmesh.breaker.open" in s["events"] for s in chats) == 5


async def test_without_live_spans_requests_still_carry_the_context(monkeypatch) -> None:
    """Live spans off (no OTLP endpoint): nothing is recorded, and a traced client's
    requests carry the current context unchanged; outside any context, none."""
    import httpx2

    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    tracing.shutdown_live_spans()
    assert not tracing.live_spans_wanted()
    tp = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    with serve_fake() as fake:
        fake.enqueue(200, completion(), times=2)
        async with tracing.traced(httpx2.AsyncClient()) as client:
            with tracing.attached(tp):
                assert tracing.current_traceparent() == tp
                await client.post(fake.url + "/v1/x", json={})
            await client.post(fake.url + "/v1/x", json={})
        sent = [r.headers.get("traceparent") for r in fake.requests]
    assert sent == [tp, None]
    tracing.shutdown_live_spans()


async def test_an_a2a_call_is_a_gateway_span_and_its_task_hangs_under_it(
        bus, telemetry, receiver, live_spans) -> None:
    """The caller's traceparent -> the gateway's live SERVER span of the call -> the
    task's ledger-derived trace (its root a child of the gateway's span)."""
    import httpx

    sys.path.insert(0, str(Path(__file__).parents[1] / "a2a"))
    from a2a_mesh import Mesh

    from jetmesh.agents.builtin import get_agent

    mesh = Mesh(bus.url, [get_agent("orders")])
    base = await mesh.start()
    try:
        trace_id, caller = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        body = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {
            "message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
                        "parts": [{"data": {"order_id": "A1001"}}],
                        "metadata": {"skill": "lookup_order"}},
            "configuration": {"returnImmediately": False}}}
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(f"{base}/", json=body, headers={
                "A2A-Version": "1.0", "traceparent": f"00-{trace_id}-{caller}-01"})
        assert r.status_code == 200, r.text
        task = r.json()["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_COMPLETED", task["status"]
        await receiver.wait_for(lambda spans: any(
            s["trace_id"] == trace_id and s["name"].startswith("invoke_workflow")
            for s in spans), what="the task's root in the caller's trace")
        tracing.shutdown_live_spans()  # flush the gateway's span
        gateway = await receiver.wait_for(lambda spans: [
            s for s in spans if s["trace_id"] == trace_id and s["scope"] == tracing.SCOPE
            and s["name"] == "POST /"], what="the gateway's span")
        assert len(gateway) == 1 and gateway[0]["kind"] == SERVER
        assert gateway[0]["parent_span_id"] == caller
        assert gateway[0]["attributes"]["http.response.status_code"] == 200
        (root,) = [s for s in receiver.trace(trace_id) if s["name"].startswith("invoke_workflow")]
        assert root["parent_span_id"] == gateway[0]["span_id"]
        assert root["attributes"]["jetmesh.task.id"] == task["id"]
    finally:
        await mesh.stop()
