"""A task end to end: declared workflow and LLM planner, raw NATS clients, bad input."""

from __future__ import annotations

import asyncio
import json

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from jetmesh.agents.models.sim import FunctionModel
from jetmesh.agents.models.types import ModelRequest
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter
from jetmesh.orchestrator.state import StepStatus, TaskStatus

ORDERS = ["A1001", "A1002", "A1003"]


def count(entries, kind) -> int:
    return sum(isinstance(e.event, kind) for e in entries)


def assert_holds_worker_results(result: dict, orders: list[str]) -> None:
    text = json.dumps(result)
    for order in orders:
        assert order in text, f"{order} missing from the final answer"
    assert len(result["steps"]) == 3


async def test_fanout_declared_workflow(make_mesh) -> None:
    mesh = await make_mesh(["support"])
    tid = await mesh.client.submit("status of my orders", workflow="fanout",
                                   input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    entries = await mesh.client.events(tid)
    # 3 workers x (model, tool, model) + 1 merge; a declared workflow needs no planner call.
    assert count(entries, ev.ModelCalled) == 7
    assert count(entries, ev.ToolCalled) == 3
    assert_holds_worker_results(state.result or {}, ORDERS)
    assert all(st.status is StepStatus.COMPLETED for st in state.steps.values())


def planner_script(request: ModelRequest) -> str:
    """A scripted planner: delegate one order to each of 3 support steps, then merge."""
    if request.output_schema is not None:  # the planning call
        goal = json.loads(request.messages[0].content)
        ids = goal["input"]["order_ids"]
        return json.dumps({"steps": [
            {"id": f"o{i}", "skill": "order_status", "input": {"order_id": oid}}
            for i, oid in enumerate(ids)], "merge": True})
    return "merged: " + request.messages[0].content  # the merge call


async def test_fanout_through_the_llm_planner_makes_8_model_calls(make_mesh) -> None:
    planner = FunctionModel(planner_script, name="scripted-planner")
    mesh = await make_mesh(["support"], planner=planner)
    tid = await mesh.client.submit("where are my three orders?", input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    entries = await mesh.client.events(tid)
    assert count(entries, ev.ModelCalled) == 8
    assert count(entries, ev.ToolCalled) == 3
    assert state.planner == "llm:sim/scripted-planner"
    purposes = [e.event.data.purpose for e in entries if isinstance(e.event, ev.ModelCalled)
                and e.event.data.step_id is None]
    assert purposes == ["plan", "merge"]
    assert_holds_worker_results(state.result or {}, ORDERS)
    assert len(planner.requests) == 2


async def test_invalid_plan_is_asked_again_once_then_the_task_fails(make_mesh) -> None:
    calls = 0

    def bad_planner(request: ModelRequest) -> str:
        nonlocal calls
        calls += 1
        return json.dumps({"steps": [{"skill": "order_status", "input": {"nope": 1}}]})

    mesh = await make_mesh(["support"], planner=FunctionModel(bad_planner))
    tid = await mesh.client.submit("anything")
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.FAILED
    assert state.code == "plan_failed" and "order_id" in (state.reason or "")
    assert calls == 2


async def test_plain_nats_client_submits_and_reads_the_result(make_mesh, bus) -> None:
    await make_mesh(["support"])
    nc = await nats.connect(bus.url)  # no jetmesh code on this side
    js = nc.jetstream()
    task_id = "raw-" + ev.new_id()[:12]
    payload = {"task_id": task_id, "goal": "where is my order?", "workflow": "fanout",
               "input": {"order_ids": ORDERS}}
    await js.publish("jm.task.submit", json.dumps(payload).encode(),
                     headers={"Nats-Msg-Id": task_id})
    sub = await js.subscribe(f"jm.task.{task_id}.events", ordered_consumer=True,
                             config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
    result = None
    try:
        while result is None:
            msg = await asyncio.wait_for(sub.next_msg(timeout=None), 30)
            event = json.loads(msg.data)
            assert event["specversion"] == "1.0" and event["subject"] == task_id
            if event["type"] == "jetmesh.task.completed.v1":
                result = event["data"]["result"]
    finally:
        await nc.close()
    assert_holds_worker_results(result, ORDERS)


async def test_bad_submissions_are_rejected_or_dead_lettered(make_mesh, bus) -> None:
    mesh = await make_mesh(["support"], no_agent_wait_s=0.5)
    dlq = await bus.js.subscribe(
        subjects.dlq(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT),
        ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW))
    marker = ev.new_id()
    await bus.js.publish(subjects.SUBMIT, b"{not json " + marker.encode())
    await bus.js.publish(subjects.SUBMIT, json.dumps(["a list", marker]).encode())
    rejected_ids = {name: f"{name}-{marker[:8]}" for name in
                    ("fields", "workflow", "oversized")}
    await bus.js.publish(subjects.SUBMIT, json.dumps(
        {"task_id": rejected_ids["fields"], "goal": 5, "input": "no"}).encode())
    await bus.js.publish(subjects.SUBMIT, json.dumps(
        {"task_id": rejected_ids["workflow"], "workflow": "no-such-flow"}).encode())
    await bus.js.publish(subjects.SUBMIT, json.dumps(
        {"task_id": rejected_ids["oversized"], "goal": "x" * 50_000}).encode())
    states = {k: await mesh.client.result(v, timeout=20) for k, v in rejected_ids.items()}
    for name, st in states.items():
        assert st.status is TaskStatus.REJECTED, (name, st)
    assert "no-such-flow" in (states["workflow"].reason or "")
    # An unknown skill (here: a plan whose skill no agent offers) fails with the reason.
    orphan = await mesh.client.submit("x", workflow="research")
    st = await mesh.client.result(orphan, timeout=20)
    assert st.status is TaskStatus.FAILED and st.code == "no_agent"
    assert "research" in (st.reason or "")
    letters = []
    while len(letters) < 2:
        msg = await dlq.next_msg(timeout=10)
        dl = DeadLetter.model_validate_json(msg.data)
        if marker.encode() in dl.data:
            letters.append(dl)
    await dlq.unsubscribe()
    assert any("not JSON" in dl.reason for dl in letters)
    assert any("JSON object" in dl.reason for dl in letters)
    # And the services keep running.
    good = await mesh.client.submit("ok", workflow="fanout", input={"order_ids": ORDERS})
    assert (await mesh.client.result(good, timeout=30)).status is TaskStatus.COMPLETED


async def test_schema_gate_stops_invalid_step_input_before_any_worker(make_mesh) -> None:
    mesh = await make_mesh(["support"])
    tid = await mesh.client.submit("x", workflow="fanout",
                                   input={"order_ids": [123, "A1002", "A1003"]})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.FAILED
    assert "invalid_input" in (state.reason or "")
    entries = await mesh.client.events(tid)
    started = {e.event.data.step_id for e in entries if isinstance(e.event, ev.StepStarted)}
    assert "order0" not in started  # the invalid step never reached a worker




async def test_two_orchestrator_replicas_drive_every_task_once(make_mesh, bus) -> None:
    from jetmesh.agents.models.sim import SimModel
    from jetmesh.bus.connection import connect, jetstream
    from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings

    mesh = await make_mesh(["support"])
    nc = await connect(bus.url)
    second = Orchestrator(nc, jetstream(nc), model=SimModel(),
                          settings=OrchestratorSettings(tick_s=0.1))
    await second.start()
    try:
        ids = [await mesh.client.submit("orders", workflow="fanout",
                                        input={"order_ids": ORDERS}) for _ in range(20)]
        states = await asyncio.gather(*(mesh.client.result(t, timeout=60) for t in ids))
    finally:
        await second.stop()
        await nc.close()
    assert all(s.status is TaskStatus.COMPLETED for s in states)
    for tid in ids:
        entries = await mesh.client.events(tid)
        for kind in (ev.TaskPlanned, ev.TaskCompleted):
            assert count(entries, kind) == 1, (tid, kind)
        dispatched = [e.event.data.step_id for e in entries
                      if isinstance(e.event, ev.StepDispatched)]
        assert sorted(dispatched) == ["order0", "order1", "order2"], dispatched
        assert count(entries, ev.StepCompleted) == 3
