"""Traces derived from the ledger, received by a real OTLP receiver process."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.telemetry import (
    GENAI_SEMCONV_VERSION,
    TelemetryService,
    task_trace_id,
)

ORDERS = ["A1001", "A1002", "A1003"]
CLIENT, INTERNAL = 3, 1  # OTLP span kinds
OK, ERROR = 1, 2


def by_id(spans: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["span_id"]: s for s in spans}


def children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent_span_id"] == parent["span_id"]]


def has_root(trace_id: str) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda spans: any(s["trace_id"] == trace_id and
                             s["name"].startswith("invoke_workflow") for s in spans)


def check_fanout_trace(spans: list[dict[str, Any]], task_id: str) -> dict[str, Any]:
    """The fan-out task's one trace, checked against the GenAI conventions; its root."""
    assert len({s["trace_id"] for s in spans}) == 1
    counts = Counter(s["span_id"] for s in spans)
    assert max(counts.values()) == 1, "a span was received twice"
    roots = [s for s in spans if s["name"] == "invoke_workflow fanout"]
    assert len(roots) == 1
    root = roots[0]
    ids = by_id(spans)
    for s in spans:  # every parent link resolves inside the trace, except the root's
        if s is not root:
            assert s["parent_span_id"] in ids, s["name"]
        assert s["start"] <= s["end"]
        assert s["attributes"]["gen_ai.conversation.id"] == task_id
        assert s["scope"] == "jetmesh.telemetry" and s["service"] == "jetmesh-test"
    ra = root["attributes"]
    assert ra["gen_ai.operation.name"] == "invoke_workflow"
    assert ra["gen_ai.agent.name"] == "fanout"
    assert root["status"] == OK
    top = children(spans, root)
    names = Counter(s["name"] for s in top)
    assert sorted(names.elements()) == ["chat dry-run", "invoke_agent support",
                                        "invoke_agent support", "invoke_agent support",
                                        "plan"], names
    plan = next(s for s in top if s["name"] == "plan")
    assert plan["attributes"]["gen_ai.operation.name"] == "plan"
    assert plan["attributes"]["jetmesh.planner"] == "workflow:fanout"
    merges = [s for s in top if s["name"].startswith("chat ")]
    assert len(merges) == 1 and merges[0]["attributes"]["jetmesh.purpose"] == "merge"
    agents = [s for s in top if s["name"].startswith("invoke_agent ")]
    assert len(agents) == 3
    assert {a["attributes"]["jetmesh.step.id"] for a in agents} == {"order0", "order1",
                                                                   "order2"}
    total_cost = 0.0
    total_in = 0
    for a in agents:
        aa = a["attributes"]
        assert aa["gen_ai.operation.name"] == "invoke_agent"
        assert aa["gen_ai.agent.name"] == "support"
        assert a["kind"] == INTERNAL and a["status"] == OK
        kids = children(spans, a)
        chats = [k for k in kids if k["name"].startswith("chat ")]
        tools = [k for k in kids if k["name"].startswith("execute_tool ")]
        assert len(chats) == 2 and len(tools) == 1 and len(kids) == 3
        for c in chats:
            ca = c["attributes"]
            assert c["kind"] == CLIENT
            assert c["name"] == f"chat {ca['gen_ai.request.model']}"
            for key in ("gen_ai.operation.name", "gen_ai.provider.name",
                        "gen_ai.request.model", "gen_ai.response.model",
                        "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
                        "gen_ai.usage.cost.total"):
                assert key in ca, key
            assert ca["gen_ai.operation.name"] == "chat"
            assert c["start"] >= a["start"] and c["end"] <= a["end"]
            total_cost += ca["gen_ai.usage.cost.total"]
            total_in += ca["gen_ai.usage.input_tokens"]
        t = tools[0]
        ta = t["attributes"]
        assert ta["gen_ai.operation.name"] == "execute_tool"
        assert t["name"] == f"execute_tool {ta['gen_ai.tool.name']}"
        assert ta["gen_ai.tool.call.id"]
        assert "gen_ai.tool.call.arguments" not in ta  # content capture is off
        assert aa["gen_ai.usage.input_tokens"] == sum(
            c["attributes"]["gen_ai.usage.input_tokens"] for c in chats)
    m = merges[0]["attributes"]
    total_cost += m["gen_ai.usage.cost.total"]
    total_in += m["gen_ai.usage.input_tokens"]
    assert ra["gen_ai.usage.cost.total"] == pytest.approx(total_cost)
    assert ra["gen_ai.usage.input_tokens"] == total_in
    assert len(spans) == 1 + 1 + 3 * 4 + 1
    return root


async def test_fanout_task_is_one_trace_with_genai_spans(make_mesh, telemetry, receiver
                                                         ) -> None:
    mesh = await make_mesh(["support"])
    tid = await mesh.client.submit("status of my orders", workflow="fanout",
                                   input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    trace_id = f"{task_trace_id(tid, None):032x}"
    await receiver.wait_for(has_root(trace_id), what=f"the root of {tid}")
    spans = receiver.trace(trace_id)
    root = check_fanout_trace(spans, tid)
    assert root["parent_span_id"] == ""
    assert root["attributes"]["gen_ai.usage.cost.total"] == pytest.approx(state.cost_usd)
    assert root["schema_url"].endswith("1.45.0") and GENAI_SEMCONV_VERSION == "0.1.0"


async def test_a_submitters_traceparent_makes_the_task_its_child(make_mesh, telemetry,
                                                                 receiver) -> None:
    mesh = await make_mesh(["support"])
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    tid = f"tp-{uuid.uuid4().hex[:10]}"
    await mesh.client.submit("status", workflow="fanout", input={"order_ids": ORDERS},
                             task_id=tid, traceparent=f"00-{trace_id}-{parent}-01")
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    await receiver.wait_for(has_root(trace_id), what="the task's root in the given trace")
    spans = receiver.trace(trace_id)
    root = check_fanout_trace(spans, tid)
    assert root["parent_span_id"] == parent


async def test_jetmesh_trace_draws_the_span_tree(make_mesh, bus, tmp_path) -> None:
    import asyncio
    import sys
    from pathlib import Path

    mesh = await make_mesh(["support"])
    tid = await mesh.client.submit("status of my orders", workflow="fanout",
                                   input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED
    proc = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "jetmesh"), "trace", tid, "--url", bus.url,
        "--data-dir", str(tmp_path), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    out, errs = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, errs.decode()
    text = out.decode()
    assert text.count("invoke_agent support") == 3
    assert text.count("execute_tool ") == 3
    assert text.count("chat ") == 7 and "invoke_workflow fanout" in text
    assert f"${state.cost_usd:.6f}" in text  # the root's total
    assert " ms" in text and "tokens " in text


def test_a_worker_killed_mid_step_gives_both_runs_and_one_side_effect() -> None:
    """Two claims of one step (the first worker died after its side effect): two
    invoke_agent spans in one trace, the first abandoned, the effect executed once."""
    from datetime import UTC, datetime, timedelta

    from jetmesh.bus import events as ev
    from jetmesh.bus.ledger import LedgerEntry, subject_for
    from jetmesh.orchestrator.telemetry import build_spans

    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    tid = "killed-mid-step"

    def at(s: float) -> datetime:
        return t0 + timedelta(seconds=s)

    events: list[ev.Event] = [
        ev.TaskSubmitted(subject=tid, time=at(0), data=ev.TaskSubmittedData(workflow="w")),
        ev.TaskPlanned(subject=tid, time=at(0.1), data=ev.TaskPlannedData(
            planner="workflow:w", steps=[ev.PlanStep(id="s1", skill="refund")])),
        ev.StepDispatched(subject=tid, time=at(0.2), data=ev.StepDispatchedData(
            step_id="s1", skill="refund", input={})),
        ev.StepStarted(subject=tid, time=at(0.3), data=ev.StepStartedData(
            step_id="s1", agent="billing", worker="w1", claim=False)),
        ev.ToolCalled(subject=tid, time=at(0.5), data=ev.ToolCalledData(
            step_id="s1", agent="billing", worker="w1", tool="refund", call_id="c1",
            side_effects=True, idempotency_key="k1", latency_ms=100)),
        # w1 is killed; the step's message is redelivered to w2, which claims it and
        # finds the effect on the line (it does not run it again).
        ev.StepStarted(subject=tid, time=at(31), data=ev.StepStartedData(
            step_id="s1", agent="billing", worker="w2", delivery=2)),
        ev.StepCompleted(subject=tid, time=at(32), data=ev.StepCompletedData(
            step_id="s1", agent="billing", worker="w2", output={"ok": True})),
        ev.TaskCompleted(subject=tid, time=at(33), data=ev.TaskCompletedData(result={})),
    ]
    entries = [LedgerEntry(i + 1, subject_for(e), e) for i, e in enumerate(events)]
    spans = build_spans(tid, entries)
    assert len({s.context.trace_id for s in spans}) == 1
    runs = [s for s in spans if s.name == "invoke_agent billing"]
    assert len(runs) == 2
    first, second = sorted(runs, key=lambda s: s.start_time or 0)
    assert first.attributes["jetmesh.worker"] == "w1"
    assert first.status.status_code.name == "ERROR" and "claimed by w2" in (
        first.status.description or "")
    assert second.attributes["jetmesh.step.delivery"] == 2
    assert second.status.status_code.name == "OK"
    tools = [s for s in spans if s.name == "execute_tool refund"]
    assert len(tools) == 1 and tools[0].parent is not None
    assert tools[0].parent.span_id == first.context.span_id
    assert first.end_time == int(at(31).timestamp() * 1e9)
    # Deterministic: the same entries give the same ids.
    again = build_spans(tid, entries)
    assert [s.context.span_id for s in again] == [s.context.span_id for s in spans]


async def test_otlp_metrics_of_a_finished_task(make_mesh, bus, receiver, monkeypatch) -> None:
    """gen_ai.client.token.usage and jetmesh.tasks reach the receiver, equal to the
    ledger's figures."""
    from pathlib import Path

    from jetmesh.bus import events as ev

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.port}")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "300")
    nc = await connect(bus.url)
    svc = TelemetryService(nc, jetstream(nc), durable=f"telemetry-m-{uuid.uuid4().hex[:8]}",
                           deliver_new=True, stats=False)
    assert svc.metrics is not None
    await svc.start()
    try:
        mesh = await make_mesh(["support"])
        tid = await mesh.client.submit("orders", workflow="fanout",
                                       input={"order_ids": ORDERS})
        await mesh.client.result(tid, timeout=30)
        entries = await mesh.client.events(tid)
        tokens_in = sum(e.event.data.input_tokens for e in entries
                        if isinstance(e.event, ev.ModelCalled))
        calls = sum(isinstance(e.event, ev.ModelCalled) for e in entries)
        path = Path(str(receiver.out) + ".metrics")

        def latest() -> dict[tuple[str, str], dict]:
            if not path.exists():
                return {}
            out: dict[tuple[str, str], dict] = {}
            for line in path.read_text().split("\n")[:-1]:
                p = json.loads(line)
                out[(p["metric"], json.dumps(p["attributes"], sort_keys=True))] = p
            return out

        deadline = asyncio.get_running_loop().time() + 20
        while True:
            pts = latest()
            usage_in = [p for (m, _), p in pts.items() if m == "gen_ai.client.token.usage"
                        and p["attributes"]["gen_ai.token.type"] == "input"]
            tasks = [p for (m, _), p in pts.items() if m == "jetmesh.tasks"]
            if usage_in and tasks and sum(p["sum"] for p in usage_in) >= tokens_in:
                break
            assert asyncio.get_running_loop().time() < deadline, pts.keys()
            await asyncio.sleep(0.1)
        assert sum(p["sum"] for p in usage_in) == tokens_in
        assert sum(p["count"] for p in usage_in) == calls
        assert all(p["unit"] == "{token}" and p["kind"] == "histogram" for p in usage_in)
        # (Tasks of other tests on the shared server may end meanwhile: recovery drives
        # them. Only the fan-out counts here.)
        mine = [p for p in tasks if p["attributes"].get("jetmesh.workflow") == "fanout"]
        assert [p["attributes"] for p in mine] == [{"jetmesh.task.status": "completed",
                                                     "jetmesh.workflow": "fanout"}]
        assert mine[0]["value"] == 1
        durations = [p for (m, _), p in pts.items() if m == "gen_ai.client.operation.duration"]
        assert sum(p["count"] for p in durations) == calls
    finally:
        await svc.stop()
        for stream in (subjects.STREAM_LEDGER, subjects.STREAM_LOG):
            await svc.js.delete_consumer(stream, svc.durable)
        await nc.close()


def test_ids_and_content_capture() -> None:
    from datetime import UTC, datetime, timedelta

    from jetmesh.bus import events as ev
    from jetmesh.bus.ledger import LedgerEntry, subject_for
    from jetmesh.orchestrator.telemetry import build_spans, capture_content, parse_traceparent

    assert parse_traceparent("00-" + "a" * 32 + "-" + "b" * 16 + "-01") == (
        int("a" * 32, 16), int("b" * 16, 16), 1)
    for bad in (None, "", "00-" + "0" * 32 + "-" + "b" * 16 + "-01", "garbage",
                "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"):
        assert parse_traceparent(bad) is None
    assert capture_content({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"})
    assert not capture_content({})
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    tid = "capture"
    events: list[ev.Event] = [
        ev.TaskSubmitted(subject=tid, time=t0, data=ev.TaskSubmittedData(goal="secret goal")),
        ev.TaskPlanned(subject=tid, time=t0, data=ev.TaskPlannedData(
            planner="llm:x/y", steps=[ev.PlanStep(id="s1", skill="k")])),
        ev.StepDispatched(subject=tid, time=t0, data=ev.StepDispatchedData(
            step_id="s1", skill="k", input={})),
        ev.StepStarted(subject=tid, time=t0, data=ev.StepStartedData(
            step_id="s1", agent="a", worker="w", claim=False)),
        ev.ToolCalled(subject=tid, time=t0 + timedelta(seconds=1), data=ev.ToolCalledData(
            step_id="s1", agent="a", worker="w", tool="t", call_id="c",
            arguments={"card": "4111"}, output={"ok": 1}, idempotency_key="k")),
        ev.ToolCalled(subject=tid, time=t0 + timedelta(seconds=1), data=ev.ToolCalledData(
            step_id="s1", agent="a", worker="w", tool="recall", call_id="m",
            arguments={"query": "q"}, output=[], idempotency_key="m")),
        ev.StepFailed(subject=tid, time=t0 + timedelta(seconds=2), data=ev.StepFailedData(
            step_id="s1", agent="a", worker="w", code="tool_limit", reason="too many")),
        ev.TaskFailed(subject=tid, time=t0 + timedelta(seconds=3), data=ev.TaskFailedData(
            code="step_failed", reason="s1 failed")),
    ]
    entries = [LedgerEntry(i + 1, subject_for(e), e) for i, e in enumerate(events)]
    off = {s.name: s for s in build_spans(tid, entries, capture=False)}
    on = {s.name: s for s in build_spans(tid, entries, capture=True)}
    assert "gen_ai.tool.call.arguments" not in off["execute_tool t"].attributes
    assert "jetmesh.task.goal" not in off["invoke_workflow"].attributes
    assert "4111" in on["execute_tool t"].attributes["gen_ai.tool.call.arguments"]
    assert off["search_memory recall"].attributes["gen_ai.operation.name"] == "search_memory"
    root, agent = off["invoke_workflow"], off["invoke_agent a"]
    assert root.status.status_code.name == "ERROR"
    assert root.attributes["error.type"] == "step_failed"
    assert agent.status.status_code.name == "ERROR"
    assert agent.attributes["error.type"] == "tool_limit"
    assert [s.context.span_id for s in build_spans(tid, entries)] == \
        [s.context.span_id for s in build_spans(tid, entries)]
    assert build_spans(tid, entries[:-1]) == []  # not finished: nothing to export
