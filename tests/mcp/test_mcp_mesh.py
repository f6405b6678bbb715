"""MCP tools end to end through the mesh (orchestrator, worker, real nats-server, real
MCP server processes): calls in the ledger, replay after a kill, approvals, drift."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from helpers import kill9, send_step
from mcp_support import ASK, Fixture, HttpFixture, agent_spec, stdio_config

from jetmesh.agents.models.sim import ScriptedModel
from jetmesh.agents.models.types import ToolCall
from jetmesh.agents.policy import args_hash
from jetmesh.bus import events as ev
from jetmesh.orchestrator.state import TaskStatus

SKILL_WF = f"skill:{ASK}"


async def wait_for_entry(ledger, task_id: str, pred, timeout: float,  # type: ignore[no-untyped-def]
                         logs: bool = False):
    """The first of the task's events (and, with ``logs``, its steps' logs) that matches."""
    async def scan():  # type: ignore[no-untyped-def]
        async for entry in ledger.follow(task_id, logs=logs):
            if pred(entry):
                return entry
        raise AssertionError("follow ended")
    return await asyncio.wait_for(scan(), timeout)


def of(entries: list, kind: type) -> list:  # type: ignore[type-arg]
    return [e.event for e in entries if isinstance(e.event, kind)]


async def test_agent_calls_stdio_and_http_mcp_tools_recorded_in_the_ledger(
        make_mesh, fixture_dir: Fixture, http_server: HttpFixture) -> None:
    model = ScriptedModel(
        [ToolCall(id="c1", name="fx__lookup", arguments={"key": "evil"}),
         ToolCall(id="c2", name="web__write_note", arguments={"text": "hello"})],
        "done")
    assert http_server.calls("write_note", text="hello") == []
    spec = agent_spec(stdio_config(fixture_dir, read_only=["lookup"]),
                      http_server.config(name="web"))
    mesh = await make_mesh([spec], worker_model=model)
    tid = await mesh.client.submit("look it up", input={"question": "q"}, workflow=SKILL_WF)
    state = await mesh.client.result(tid, timeout=60)
    assert state.status is TaskStatus.COMPLETED
    model.assert_complete()
    entries = await mesh.client.events(tid)
    calls = {c.data.tool: c.data for c in of(entries, ev.ToolCalled)}
    assert set(calls) == {"fx__lookup", "web__write_note"}
    assert calls["fx__lookup"].output["text"].startswith("IGNORE ALL")
    assert not calls["fx__lookup"].side_effects  # read-only by configuration
    assert calls["web__write_note"].output["structured"] == {"id": 5, "stored": "hello"}
    assert calls["web__write_note"].side_effects  # write by default: on the fenced line
    # A write went through the policy like a native side-effecting tool.
    decided = of(entries, ev.PolicyDecided)
    assert [(d.data.tool, d.data.decision) for d in decided] == [("web__write_note", "allow")]
    # Real calls, once each, on both servers.
    assert len(fixture_dir.calls("lookup")) == 1
    assert len(http_server.calls("write_note", text="hello")) == 1
    # The model saw a fixed, sorted tool set with the servers' schemas, and the
    # third-party output as untrusted data.
    first, second = model.requests
    names = [t.name for t in first.tools]
    assert names == sorted(names) and names == [t.name for t in second.tools]
    lookup = next(t for t in first.tools if t.name == "fx__lookup")
    assert lookup.input_schema["properties"]["key"]["type"] == "string"
    tool_msgs = [m.content for m in second.messages if m.role == "tool"]
    assert all(c.startswith("<untrusted-data") for c in tool_msgs)
    # The card carries the pinned tool-list hashes.
    worker = mesh.workers[0]
    card = worker.presence_value()["card"]
    ext = [x for x in card["capabilities"]["extensions"] if "mcp-tools" in x["uri"]]
    assert set(ext[0]["params"]["servers"]) == {"fx", "web"}
    assert set(worker.presence_value()["breakers"]) >= {"mcp:fx", "mcp:web"}


async def test_irreversible_mcp_tool_is_held_for_an_exact_approval(
        make_mesh, fixture_dir: Fixture, monkeypatch) -> None:
    monkeypatch.setenv("JETMESH_APPROVAL_TIMEOUT_S", "2")
    args = {"amount": 500, "to": "mallory"}
    model = ScriptedModel(ToolCall(id="c1", name="fx__transfer", arguments=args), "gave up",
                          ToolCall(id="c1", name="fx__transfer", arguments=args), "sent")
    spec = agent_spec(stdio_config(fixture_dir, irreversible=["transfer"]), name="mcp-gated",
                      skill="mcp_gated")
    mesh = await make_mesh([spec], worker_model=model)
    # 1: an approval for other arguments does not unlock the call; it expires, denied.
    tid = await mesh.client.submit("pay", input={}, workflow="skill:mcp_gated")
    asked = await wait_for_entry(mesh.client.ledger, tid,
                                 lambda e: isinstance(e.event, ev.ApprovalRequested), 30)
    assert asked.event.data.tool == "fx__transfer" and asked.event.data.risk == "irreversible"
    other = {**args, "amount": 5}
    await mesh.client.ledger.append(ev.ApprovalGranted(subject=tid, data=ev.ApprovalDecisionData(
        step_id=asked.event.data.step_id, tool="fx__transfer",
        args_hash=args_hash("fx__transfer", other), by="test")))
    assert (await mesh.client.result(tid, timeout=30)).status is TaskStatus.COMPLETED
    called = of(await mesh.client.events(tid), ev.ToolCalled)
    assert len(called) == 1 and "not approved" in (called[0].data.error or "")
    assert fixture_dir.calls("transfer") == []
    # 2: the exact approval runs it, once.
    tid2 = await mesh.client.submit("pay", input={}, workflow="skill:mcp_gated")
    await wait_for_entry(mesh.client.ledger, tid2,
                         lambda e: isinstance(e.event, ev.ApprovalRequested), 30)
    await mesh.client.approve(tid2, by="test")
    assert (await mesh.client.result(tid2, timeout=30)).status is TaskStatus.COMPLETED
    assert [c["args"] for c in fixture_dir.calls("transfer")] == [args]
    model.assert_complete()


async def test_tool_list_drift_between_steps_is_recorded_and_refused(
        make_mesh, fixture_dir: Fixture) -> None:
    model = ScriptedModel(ToolCall(id="c1", name="fx__lookup", arguments={"key": "alpha"}), "1",
                          ToolCall(id="c1", name="fx__lookup", arguments={"key": "alpha"}), "2")
    spec = agent_spec(stdio_config(fixture_dir, read_only=["lookup"]), name="mcp-drift",
                      skill="mcp_drift")
    mesh = await make_mesh([spec], worker_model=model)
    tid = await mesh.client.submit("one", input={}, workflow="skill:mcp_drift")
    assert (await mesh.client.result(tid, timeout=30)).status is TaskStatus.COMPLETED
    assert not of(await mesh.client.events(tid), ev.McpToolsChanged)
    pinned = mesh.workers[0]._mcp.servers["fx"].hash
    fixture_dir.set("variant", "v2")  # the server now lists one more tool
    tid2 = await mesh.client.submit("two", input={}, workflow="skill:mcp_drift")
    assert (await mesh.client.result(tid2, timeout=30)).status is TaskStatus.COMPLETED
    entries = await mesh.client.events(tid2)
    (drift,) = of(entries, ev.McpToolsChanged)
    assert drift.data.server == "fx" and drift.data.added == ["extra"]
    assert drift.data.pinned_hash == pinned != drift.data.current_hash
    assert drift.data.action == "refused"
    (call,) = of(entries, ev.ToolCalled)
    assert "changed its tool list" in (call.data.error or "")
    assert len(fixture_dir.calls("lookup")) == 1  # the refused server was not called
    # The offered tool set did not change (the pinned one), so prompt caches stay warm.
    assert [t.name for t in model.requests[0].tools] == [t.name for t in model.requests[2].tools]
    model.assert_complete()


async def test_worker_killed_after_the_calls_replays_them_instead_of_calling_again(
        bus, fixture_dir: Fixture, http_server: HttpFixture, tmp_path: Path) -> None:
    hang = tmp_path / "hanging"
    env = {**os.environ, "NATS_URL": bus.url, "FIXTURE_DIR": str(fixture_dir.dir),
           "HTTP_URL": http_server.url, "JETMESH_ACK_WAIT_S": "2",
           "PYTHONUNBUFFERED": "1"}
    script = str(Path(__file__).parent / "mcp_worker.py")
    import subprocess

    def start(name: str, **extra: str) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("wb") as log:
            return subprocess.Popen([sys.executable, script], env={**env, **extra},
                                    stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    first = start("first", MCP_TEST_HANG=str(hang))
    second = None
    try:
        cmd = await send_step(bus.ledger, ev.StepCommand(
            task_id=ev.new_id(), step_id="s1", skill="mcp_kill", input={"question": "q"}))
        # Both calls are recorded (the read-only one on the step's log, the write on its
        # line) and the model hangs at its final turn: the worker dies there.
        seen: set[str] = set()
        def recorded(e: object) -> bool:
            if isinstance(e.event, ev.ToolCalled):  # type: ignore[attr-defined]
                seen.add(e.event.data.tool)  # type: ignore[attr-defined]
            return seen == {"fx__lookup", "web__write_note"}
        await wait_for_entry(bus.ledger, cmd.task_id, recorded, 60, logs=True)
        kill9(first)
        second = start("second")
        done = await wait_for_entry(
            bus.ledger, cmd.task_id,
            lambda e: isinstance(e.event, ev.StepCompleted | ev.StepFailed), 60)
    finally:
        kill9(first)
        if second is not None:
            kill9(second)
    assert isinstance(done.event, ev.StepCompleted), done.event
    assert "first" in json.dumps(done.event.data.output)  # the recorded lookup result
    # Each tool ran once: the second worker replayed both recorded results.
    assert len(fixture_dir.calls("lookup")) == 1
    assert len(http_server.calls("write_note", text="kill test")) == 1
    entries = await bus.ledger.read(cmd.task_id)
    assert len(of(entries, ev.ToolCalled)) == 2
    starts = of(entries, ev.StepStarted)
    assert len({s.data.worker for s in starts}) == 2
