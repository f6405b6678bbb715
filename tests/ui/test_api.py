"""The dashboard's HTTP API on a real nats-server, orchestrator, workers and gateway."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
from ui_support import APPROVER_TOKEN, READER_TOKEN, TRACE_URL, UiMesh, wait_event

from jetmesh.agents.builtin.support import refunds_file
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.stats import put_summary, task_summary
from jetmesh.orchestrator.tasks_kv import (
    CHECKPOINT_KEY,
    TaskProjector,
    TaskSummary,
    is_log,
    open_bucket,
    task_key,
)


def refunds() -> list[dict[str, Any]]:
    path = refunds_file()
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def sse_events(c: httpx.AsyncClient, path: str, until: Any, timeout: float = 30
                     ) -> list[tuple[str, dict[str, Any]]]:
    """Read server-sent events from `path` until `until(events)` is true."""
    got: list[tuple[str, dict[str, Any]]] = []

    async def read() -> None:
        async with c.stream("GET", path) as r:
            assert r.status_code == 200, await r.aread()
            assert r.headers["content-type"].startswith("text/event-stream")
            name = ""
            async for line in r.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    got.append((name, json.loads(line[6:])))
                    if until(got):
                        return
    await asyncio.wait_for(read(), timeout)
    return got


async def test_login_roles_and_csrf(ui_mesh: UiMesh) -> None:
    async with ui_mesh.http() as anon:
        assert (await anon.get("/api/tasks")).status_code == 401
        assert (await anon.post("/api/login", json={"token": "nope"})).status_code == 401
        # A form post (what a cross-site page can send without a preflight) is refused.
        r = await anon.post("/api/login", data={"token": APPROVER_TOKEN})
        assert r.status_code == 403
        page = await anon.get("/")
        assert page.status_code == 200 and "app.js" in page.text
        assert (await anon.get("/static/app.js")).status_code == 200
        raw = (await anon.post("/api/login", json={"token": APPROVER_TOKEN})).headers.get_list(
            "set-cookie")
        assert len(raw) == 2 and all("samesite=strict" in h.lower() for h in raw)
        session = next(h for h in raw if h.startswith("jm_session="))
        assert "httponly" in session.lower()
        assert "httponly" not in next(h for h in raw if h.startswith("jm_csrf=")).lower()
        # Logged in, but a state change without the CSRF header is refused.
        r = await anon.post("/api/tasks/t-none/cancel", json={})
        assert r.status_code == 403 and "CSRF" in r.json()["error"]
    async with ui_mesh.session(APPROVER_TOKEN) as c:
        assert (await c.get("/api/me")).json() == {"name": "alice", "role": "approver",
                                                   "may_act": True}
        r = await c.post("/api/tasks/t-none/cancel", json={},
                         headers={"X-CSRF-Token": "forged"})
        assert r.status_code == 403
        r = await c.post("/api/tasks/t-none/cancel", json={},
                         headers={"Origin": "http://evil.example"})
        assert r.status_code == 403
        # With it, the request reaches the action (here: there is no such task).
        assert (await c.post("/api/tasks/t-none/cancel", json={})).status_code == 409
        # A tampered session cookie is nobody.
        value = c.cookies["jm_session"]
        c.cookies.set("jm_session", value[:-2] + ("00" if value[-2:] != "00" else "11"),
                      path="/ui")
        assert (await c.get("/api/me")).status_code == 401


async def test_task_list_comes_from_the_projection_live(ui_mesh: UiMesh) -> None:
    async with ui_mesh.session(READER_TOKEN) as c:
        first = (await c.get("/api/tasks")).json()
        ids = [await ui_mesh.client.submit(f"gate list{i}", workflow="wait_ui",
                                           user_id="ann" if i else "ben") for i in range(3)]
        # The live list names each new task as the projection changes (no reload).
        seen: set[str] = set()

        def all_working(events: list[tuple[str, dict[str, Any]]]) -> bool:
            for name, body in events:
                for t in body.get("tasks", []) if name == "tasks" else []:
                    if t["task_id"] in ids and t["status"] == "working":
                        seen.add(t["task_id"])
            return seen == set(ids)
        await sse_events(c, f"/api/tasks/live?version={first['version']}", all_working)
        for i in range(3):
            ui_mesh.gates.gate(f"list{i}").set()
        for t in ids:
            await ui_mesh.wait_status(t, "completed")
        r = await c.get("/api/tasks", params={"state": "completed", "limit": 500})
        assert r.status_code == 200, r.text
        listed = r.json()
        assert set(ids) <= {t["task_id"] for t in listed["tasks"]}
        assert listed["counts"]["completed"] >= 3
        one = (await c.get("/api/tasks", params={"q": ids[1][-10:]})).json()
        assert [t["task_id"] for t in one["tasks"]] == [ids[1]]
        mine = (await c.get("/api/tasks", params={"user": "ben", "workflow": "wait_ui"})
                ).json()
        assert ids[0] in {t["task_id"] for t in mine["tasks"]}
        assert not set(ids[1:]) & {t["task_id"] for t in mine["tasks"]}
        row = next(t for t in listed["tasks"] if t["task_id"] == ids[0])
        assert row["workflow"] == "wait_ui" and row["steps_done"] == 1 == row["steps_total"]
        assert row["duration_s"] > 0 and row["goal"] == "[hidden]"  # read-only: no content
    # The projection's checkpoint moved past these tasks' events.
    kv = await open_bucket(ui_mesh.client.js, create=False)
    assert kv is not None
    top = max([(await ui_mesh.client.events(t))[-1].seq for t in ids])
    projector = ui_mesh.dashboard().projector
    assert projector is not None
    await projector.wait_for_seq(top, 10)
    assert json.loads((await kv.get(CHECKPOINT_KEY)).value or b"0")["ledger"] >= top


async def test_timeline_stream_equals_the_ledger(ui_mesh: UiMesh) -> None:
    tid = await ui_mesh.client.submit("gate tl1", workflow="wait2_ui",
                                      input={"then": "gate tl2"})
    async with ui_mesh.session(APPROVER_TOKEN) as c:
        async def stream() -> list[tuple[str, dict[str, Any]]]:
            return await sse_events(c, f"/api/tasks/{tid}/live?after=0",
                                    lambda es: es[-1][1]["type"] == "jetmesh.task.completed.v1")
        reading = asyncio.create_task(stream())
        await asyncio.wait_for(ui_mesh.gates.start("tl1").wait(), 20)
        ui_mesh.gates.gate("tl1").set()
        ui_mesh.gates.gate("tl2").set()
        got = await reading
        ledger = await ui_mesh.client.events(tid)
        # Every event once (the steps' logs may interleave differently as they arrive
        # from a stream of their own; each stream's own order is kept).
        assert sorted(b["seq"] for _, b in got) == sorted(e.seq for e in ledger)
        assert {(b["seq"], b["type"]) for _, b in got} == {(e.seq, e.event.type)
                                                            for e in ledger}
        own = [b["seq"] for _, b in got if not is_log(b["seq"])]
        assert own == sorted(own)
        detail = (await c.get(f"/api/tasks/{tid}")).json()
        assert [e["seq"] for e in detail["events"]] == [e.seq for e in ledger]
        assert {k: s["status"] for k, s in detail["steps"].items()} == {
            "first": "completed", "second": "completed"}
        assert [p["id"] for p in detail["plan"]] == ["first", "second"]
        calls = detail["calls"]
        assert [c_["step_id"] for c_ in calls if c_["kind"] == "model"] == ["first", "second"]
        assert all(c_["latency_ms"] >= 0 and "input_tokens" in c_ for c_ in calls
                   if c_["kind"] == "model")
        trace_id = detail["trace_url"].rsplit("/", 1)[1]
        assert detail["trace_url"] == TRACE_URL.format(trace_id=trace_id)
        assert (await ui_mesh.client.state(tid)).traceparent.split("-")[1] == trace_id
        # Fork it from its second step: a new task that re-runs only that step.
        r = await c.post(f"/api/tasks/{tid}/replay", json={"from_step": "second"})
        assert r.status_code == 200 and r.json()["kind"] == "fork", r.text
        fork = await ui_mesh.client.result(r.json()["task_id"], timeout=30)
        assert fork.status.value == "completed" and fork.submitted is not None
        assert fork.submitted.replay_of == tid and fork.submitted.fork is not None
        assert fork.submitted.fork.from_step == "second"


async def test_approve_from_the_inbox_runs_the_call_once(ui_mesh: UiMesh) -> None:
    before = len(refunds())
    tid = await ui_mesh.client.submit("refund 230 on A1029", workflow="refund_ui")
    asked = await wait_event(ui_mesh.client, tid, ev.ApprovalRequested)
    await ui_mesh.wait_status(tid, "input-required")
    async with ui_mesh.session(READER_TOKEN) as reader, \
            ui_mesh.session(APPROVER_TOKEN) as approver:
        inbox = (await reader.get("/api/approvals")).json()
        row = next(a for a in inbox["approvals"] if a["task_id"] == tid)
        assert inbox["may_decide"] is False and row["arguments"] == "[hidden]"
        body = {"step_id": row["step_id"], "tool": row["tool"], "args_hash": row["args_hash"]}
        r = await reader.post(f"/api/tasks/{tid}/approve", json=body)
        assert r.status_code == 403  # the server refuses, whatever the page shows
        seen = (await reader.get(f"/api/tasks/{tid}")).json()
        text = json.dumps(seen)
        assert "A1029" not in text and "refund 230" not in text  # no content for read-only
        assert any(e["line"].startswith("approval requested: issue_refund")
                   for e in seen["events"])
        full = next(a for a in (await approver.get("/api/approvals")).json()["approvals"]
                    if a["task_id"] == tid)
        assert full["arguments"] == {"order_id": "A1029", "amount_usd": 230.0,
                                     "reason": "customer asked"}
        assert full["args_hash"] == asked.data.args_hash and full["tool"] == "issue_refund"
        assert full["rule"] and full["reason"] and 0 < full["seconds_left"] <= 60
        # Approving other arguments than the ones pending decides nothing.
        r = await approver.post(f"/api/tasks/{tid}/approve", json={**body, "args_hash": "0" * 64})
        assert r.status_code == 409
        r = await approver.post(f"/api/tasks/{tid}/approve", json=body)
        assert r.status_code == 200, r.text
        state = await ui_mesh.client.result(tid, timeout=30)
        assert state.status.value == "completed"
        made = refunds()[before:]
        assert len(made) == 1 and made[0]["amount_usd"] == 230
        granted = [e.event for e in await ui_mesh.client.events(tid)
                   if isinstance(e.event, ev.ApprovalGranted)]
        assert len(granted) == 1 and granted[0].data.by == "ui:alice"
        assert granted[0].data.args_hash == asked.data.args_hash
        # Twice is refused: nothing is pending any more.
        assert (await approver.post(f"/api/tasks/{tid}/approve", json=body)).status_code == 409


async def test_deny_ends_it_as_the_cli_would(ui_mesh: UiMesh) -> None:
    before = len(refunds())
    tid = await ui_mesh.client.submit("refund 240 on A1029", workflow="refund_ui")
    asked = await wait_event(ui_mesh.client, tid, ev.ApprovalRequested)
    async with ui_mesh.session(APPROVER_TOKEN) as c:
        r = await c.post(f"/api/tasks/{tid}/deny", json={
            "step_id": asked.data.step_id, "tool": asked.data.tool,
            "args_hash": asked.data.args_hash, "reason": "too much"})
        assert r.status_code == 200, r.text
    state = await ui_mesh.client.result(tid, timeout=30)
    denied = [e.event for e in await ui_mesh.client.events(tid)
              if isinstance(e.event, ev.ApprovalDenied)]
    assert len(denied) == 1 and denied[0].data.by == "ui:alice"
    assert denied[0].data.reason == "too much"
    assert state.status.value == "completed" and not state.pending_approvals
    assert len(refunds()) == before  # the call never ran


async def test_cancel_and_read_only_cannot(ui_mesh: UiMesh) -> None:
    tid = await ui_mesh.client.submit("gate cancel1", workflow="wait_ui")
    await asyncio.wait_for(ui_mesh.gates.start("cancel1").wait(), 20)
    async with ui_mesh.session(READER_TOKEN) as reader:
        assert (await reader.post(f"/api/tasks/{tid}/cancel", json={})).status_code == 403
    async with ui_mesh.session(APPROVER_TOKEN) as c:
        r = await c.post(f"/api/tasks/{tid}/cancel", json={"reason": "not needed"})
        assert r.status_code == 200
        state = await ui_mesh.client.result(tid, timeout=20)
        assert state.status.value == "canceled"
        asked = [e.event for e in await ui_mesh.client.events(tid)
                 if isinstance(e.event, ev.CancelRequested)]
        assert asked[0].data.by == "ui:alice"
        # A finished task cannot be canceled again.
        assert (await c.post(f"/api/tasks/{tid}/cancel", json={})).status_code == 409


async def test_dead_letter_redrive_replay_agents_and_stats(ui_mesh: UiMesh) -> None:
    js = ui_mesh.client.js
    # A submission that was dead-lettered (say, the orchestrator was broken), now fixed.
    sub = ev.TaskSubmission(goal="gate dl1", workflow="wait_ui")
    raw = sub.model_dump_json().encode()
    letter = DeadLetter(stream=subjects.STREAM_TASKS, consumer=subjects.CONSUMER_ORCH_SUBMIT,
                        subject=subjects.SUBMIT, reason="orchestrator was down",
                        data_b64=base64.b64encode(raw).decode(), task_id=sub.task_id,
                        headers={"Nats-Msg-Id": sub.task_id})
    ack = await js.publish(subjects.dlq(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT),
                           letter.model_dump_json().encode())
    async with ui_mesh.session(READER_TOKEN) as reader:
        rows = (await reader.get("/api/dlq")).json()["dead_letters"]
        row = next(r for r in rows if r["seq"] == ack.seq)
        assert row["reason"] == "orchestrator was down" and row["data"] == "[hidden]"
        assert (await reader.post(f"/api/dlq/{ack.seq}/redrive", json={})).status_code == 403
    async with ui_mesh.session(APPROVER_TOKEN) as c:
        row = next(r for r in (await c.get("/api/dlq")).json()["dead_letters"]
                   if r["seq"] == ack.seq)
        assert row["data"] == raw.decode() and row["data_bytes"] == len(raw)
        r = await c.post(f"/api/dlq/{ack.seq}/redrive", json={})
        assert r.status_code == 200, r.text
        assert ack.seq not in {r["seq"] for r in (await c.get("/api/dlq")).json()["dead_letters"]}
        ui_mesh.gates.gate("dl1").set()
        state = await ui_mesh.client.result(sub.task_id, timeout=30)
        assert state.status.value == "completed"

        # Replay the finished task from the page's API: a new task, replay_of the old.
        r = await c.post(f"/api/tasks/{sub.task_id}/replay", json={})
        assert r.status_code == 200, r.text
        replay = await ui_mesh.client.result(r.json()["task_id"], timeout=30)
        assert replay.status.value == "completed"
        assert replay.submitted is not None and replay.submitted.replay_of == sub.task_id
        r = await c.post(f"/api/tasks/{sub.task_id}/replay", json={"from_step": "nope"})
        assert r.status_code == 409

        agents = (await c.get("/api/agents")).json()["agents"]
        by_name = {a["name"]: a for a in agents}
        assert {"refunder", "waiter"} <= set(by_name)
        assert by_name["refunder"]["skills"][0]["id"] == "refund_ui"
        assert by_name["refunder"]["replicas"][0]["replica"] == "refunder-ui"
        assert by_name["refunder"]["signed"] is False

        summary = task_summary(sub.task_id, await ui_mesh.client.events(sub.task_id))
        assert summary is not None
        await put_summary(js, summary)
        stats = (await c.get("/api/stats")).json()
        assert stats["figures"]["all"]["tasks"] >= 1
        assert sum(s["tasks"] for s in stats["series"]) == stats["figures"]["all"]["tasks"]


async def test_projector_restart_reads_only_open_tasks(ui_mesh: UiMesh) -> None:
    """A second projector resumes from the checkpoint: it folds again only the tasks
    still open, and what it writes equals what the first one wrote."""
    tid = await ui_mesh.client.submit("gate restart1", workflow="wait_ui")
    await ui_mesh.wait_status(tid, "working")
    dash = ui_mesh.dashboard()
    assert dash.index is not None
    loads: list[str] = []

    class Counting(TaskProjector):
        async def _load(self, task_id: str):  # type: ignore[no-untyped-def]
            loads.append(task_id)
            return await super()._load(task_id)

    p = Counting(ui_mesh.client.js, ui_mesh.client.ledger)
    await p.start()
    try:
        assert tid in loads
        closed = {t for t, s in dash.index.tasks.items() if s.status.terminal}
        assert closed and not closed & set(loads)
        ui_mesh.gates.gate("restart1").set()
        await ui_mesh.wait_status(tid, "completed")
        await p.wait_for_seq((await ui_mesh.client.events(tid))[-1].seq, 20)
    finally:
        await p.stop()
    assert dash.index.tasks[tid].status.value == "completed"


async def test_cli_tasks_reads_the_projection(ui_mesh: UiMesh) -> None:
    """`jetmesh tasks` lists from jm-tasks: a row planted there (no such task in the
    ledger) is listed, and a task finished a moment ago shows its end."""
    tid = await ui_mesh.client.submit("gate clitasks", workflow="wait_ui")
    ui_mesh.gates.gate("clitasks").set()
    await ui_mesh.client.result(tid, timeout=20)
    kv = await open_bucket(ui_mesh.client.js)
    assert kv is not None
    planted = TaskSummary(task_id="only-in-the-projection", status=TaskStatus.COMPLETED,
                          goal="planted", last_seq=10**9)
    await kv.put(task_key(planted.task_id), planted.model_dump_json().encode())
    try:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("jetmesh")), "tasks", "--limit", "500",
            cwd=str(ui_mesh.data_dir), env={**os.environ, "NATS_URL": ui_mesh.url,
                                            "COLUMNS": "200"},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, errs = await proc.communicate()
        assert proc.returncode == 0, errs.decode()
        lines = out.decode().splitlines()
        assert any("only-in-the-projection" in x and "planted" in x for x in lines)
        assert any(tid in x and "completed" in x for x in lines), out.decode()
    finally:
        await kv.delete(task_key(planted.task_id))
