"""Trust at the edges, on a real nats-server (issue 14): a resubmission never touches an
existing task, nothing changes a task after its end, a garbage ledger message does not
stop recovery, and an invalid and a valid submission of one new id never both land."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from edge_agents import ECHO, ECHO_FLOW, stale_view, unserved_flow
from mesh_fixtures import Mesh, make_mesh  # noqa: F401
from nats.js.api import ConsumerConfig, DeliverPolicy

from jetmesh.agents.models.sim import FunctionModel, SimModel
from jetmesh.agents.models.types import ModelRequest
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.dlq import DeadLetter
from jetmesh.orchestrator.client import NoPendingApproval, NoSuchTask, TaskFinished
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.state import TaskStatus, fold


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20) -> None:
    """Wait for a condition on the bus, with a deadline (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    pause = 0.01
    while not await check():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)


async def submit_consumer_idle(js) -> bool:
    info = await js.consumer_info(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def raw_submit(js, body: object, *, headers: dict[str, str] | None = None) -> None:
    """A submission as any NATS client may send it: no Nats-Msg-Id, so JetStream's
    duplicate window does not stand in for the orchestrator's own check."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    await js.publish(subjects.SUBMIT, data, headers=headers)


@pytest.fixture
async def letters(bus):
    """Dead letters of the submit consumer from now on, decoded."""
    got: list[DeadLetter] = []

    async def take(msg) -> None:
        got.append(DeadLetter.model_validate_json(msg.data))

    sub = await bus.js.subscribe(
        subjects.dlq(subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT),
        ordered_consumer=True, config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
        cb=take)
    yield got
    await sub.unsubscribe()


def about(letters: list[DeadLetter], task_id: str) -> list[DeadLetter]:
    out = []
    for x in letters:
        try:
            body = json.loads(x.data)
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("task_id") == task_id:
            out.append(x)
    return out


async def echo_mesh(make_mesh) -> Mesh:  # noqa: F811
    mesh = await make_mesh([ECHO])
    mesh.orchestrator.workflows.add(ECHO_FLOW)
    return mesh


# ---------------------------------------------------------------- (2) resubmission


async def test_a_resubmission_never_touches_an_existing_task(make_mesh, bus,  # noqa: F811
                                                             letters) -> None:
    mesh = await echo_mesh(make_mesh)
    done = await mesh.client.submit("hello", workflow="edge-echo")
    assert (await mesh.client.result(done, timeout=20)).status is TaskStatus.COMPLETED
    skill = "resub" + ev.new_id()[:8]
    mesh.orchestrator.workflows.add(unserved_flow(skill))
    running = await mesh.client.submit("x", workflow=skill)
    await until(lambda: _dispatched(mesh, running), "the open task's dispatch")
    before = {t: len(await mesh.client.events(t)) for t in (done, running)}

    for tid in (done, running):
        await raw_submit(bus.js, {"task_id": tid, "goal": 5, "input": "no"})  # invalid
        await raw_submit(bus.js, {"task_id": tid, "goal": "other", "workflow": "edge-echo"})
    await until(lambda: _letters_for(letters, [done, running], 2), "the refusals")
    await until(lambda: submit_consumer_idle(bus.js), "the submit consumer to settle")

    for tid in (done, running):
        assert len(await mesh.client.events(tid)) == before[tid], "the task was touched"
        assert [x.reason for x in about(letters, tid)] == ["task exists"] * 2
    assert (await mesh.client.state(done)).status is TaskStatus.COMPLETED
    assert (await mesh.client.state(running)).status is TaskStatus.WORKING


async def test_an_identical_resubmission_is_a_quiet_no_op(make_mesh, bus,  # noqa: F811
                                                          letters) -> None:
    mesh = await echo_mesh(make_mesh)
    body = {"task_id": ev.new_id(), "goal": "same", "workflow": "edge-echo"}
    await raw_submit(bus.js, body)
    tid = str(body["task_id"])
    assert (await mesh.client.result(tid, timeout=20)).status is TaskStatus.COMPLETED
    n = len(await mesh.client.events(tid))
    await raw_submit(bus.js, body)
    await until(lambda: submit_consumer_idle(bus.js), "the submit consumer to settle")
    assert len(await mesh.client.events(tid)) == n
    assert about(letters, tid) == []


async def test_a_refused_resubmission_is_answered_on_its_reply_inbox(make_mesh,  # noqa: F811
                                                                     bus) -> None:
    mesh = await echo_mesh(make_mesh)
    tid = await mesh.client.submit("hello", workflow="edge-echo")
    await mesh.client.result(tid, timeout=20)
    inbox = bus.nc.new_inbox()
    sub = await bus.nc.subscribe(inbox)
    try:
        await raw_submit(bus.js, {"task_id": tid, "goal": "hijack"},
                         headers={"Jm-Reply-To": inbox})
        reply = json.loads((await sub.next_msg(timeout=20)).data)
    finally:
        await sub.unsubscribe()
    assert reply == {"task_id": tid, "error": "task exists"}


async def test_an_invalid_and_a_valid_submission_of_one_new_id_never_both_land(
        make_mesh, bus, letters) -> None:  # noqa: F811
    mesh = await echo_mesh(make_mesh)
    ids = [f"race-{ev.new_id()[:12]}" for _ in range(30)]
    for i, tid in enumerate(ids):
        bad = {"task_id": tid, "goal": 5}
        good = {"task_id": tid, "goal": "g", "workflow": "edge-echo"}
        for body in ((bad, good) if i % 2 else (good, bad)):
            await raw_submit(bus.js, body)
    states = await asyncio.gather(*(mesh.client.result(t, timeout=30) for t in ids))
    await until(lambda: submit_consumer_idle(bus.js), "the submit consumer to settle")
    for tid, st in zip(ids, states, strict=True):
        events = [e.event for e in await mesh.client.events(tid)]
        ends = [e for e in events if isinstance(e, ev.TERMINAL_TASK_EVENTS)]
        assert len(ends) == 1, (tid, [e.type for e in events])
        if st.status is TaskStatus.REJECTED:
            assert [e.type for e in events] == ["jetmesh.task.rejected.v1"]
        else:
            assert st.status is TaskStatus.COMPLETED
        assert [x.reason for x in about(letters, tid)] == ["task exists"]


async def _dispatched(mesh: Mesh, tid: str) -> bool:
    """Planned, and its step dispatched (queued for an agent) or waiting for one."""
    return any(isinstance(e.event, ev.TaskPlanned) for e in await mesh.client.events(tid))


async def _letters_for(letters: list[DeadLetter], ids: list[str], n: int) -> bool:
    return all(len(about(letters, t)) >= n for t in ids)


# ---------------------------------------------------------------- (6) after the end


async def test_controls_on_a_finished_task_are_refused(make_mesh) -> None:  # noqa: F811
    mesh = await echo_mesh(make_mesh)
    tid = await mesh.client.submit("hello", workflow="edge-echo")
    await mesh.client.result(tid, timeout=20)
    n = len(await mesh.client.events(tid))
    with pytest.raises(TaskFinished):
        await mesh.client.cancel(tid)
    with pytest.raises(TaskFinished):
        await mesh.client.approve(tid)
    with pytest.raises(TaskFinished):
        await mesh.client.deny(tid, reason="no")
    assert len(await mesh.client.events(tid)) == n
    with pytest.raises(NoSuchTask):
        await mesh.client.cancel("never-" + ev.new_id()[:8])
    skill = "noappr" + ev.new_id()[:8]
    mesh.orchestrator.workflows.add(unserved_flow(skill))
    open_task = await mesh.client.submit("x", workflow=skill)
    await until(lambda: _dispatched(mesh, open_task), "the open task's dispatch")
    with pytest.raises(NoPendingApproval):
        await mesh.client.approve(open_task)


async def test_a_cancel_raced_past_the_check_changes_nothing(make_mesh, bus) -> None:  # noqa: F811
    """A cancel appended after the end (it passed the client's check, or came from any
    NATS client): the fold ignores it and the orchestrator appends nothing after it."""
    mesh = await echo_mesh(make_mesh)
    tid = await mesh.client.submit("hello", workflow="edge-echo")
    await mesh.client.result(tid, timeout=20)
    await mesh.client.ledger.append(ev.CancelRequested(
        subject=tid, source="test", data=ev.CancelRequestedData(reason="late")))
    mark = await mesh.client.submit("marker", workflow="edge-echo")  # after it in the stream
    await mesh.client.result(mark, timeout=20)
    await until(lambda: _control_idle(bus.js), "the control consumer to settle")
    events = [e.event for e in await mesh.client.events(tid)]
    assert isinstance(events[-1], ev.CancelRequested)
    state = await mesh.client.state(tid)
    assert state.status is TaskStatus.COMPLETED and state.cancel_requested is None


async def _control_idle(js) -> bool:
    info = await js.consumer_info(subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL)
    return info.num_pending == 0 and info.num_ack_pending == 0


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": url}
    return subprocess.run([str(Path(sys.executable).parent / "jetmesh"), *args],
                          capture_output=True, text=True, env=env, timeout=60, check=False)


async def test_the_cli_refuses_controls_on_a_finished_task(make_mesh, bus) -> None:  # noqa: F811
    mesh = await echo_mesh(make_mesh)
    tid = await mesh.client.submit("hello", workflow="edge-echo")
    await mesh.client.result(tid, timeout=20)
    n = len(await mesh.client.events(tid))
    for args in (["cancel", tid], ["approve", tid], ["deny", tid, "--reason", "no"]):
        out = await asyncio.to_thread(_cli, *args, url=bus.url)
        assert out.returncode != 0, (args, out.stdout, out.stderr)
        assert "completed" in out.stderr and "nothing changed" in out.stderr, out.stderr
    assert len(await mesh.client.events(tid)) == n


# ---------------------------------------------------------------- recovery


async def test_recovery_skips_a_garbage_ledger_message(bus) -> None:
    """Recovery read raw bytes and json.loads'ed them: one garbage message on any
    task's events subject stopped the recovery of every other task."""
    junk = "junk-" + ev.new_id()[:8]
    await bus.js.publish(subjects.task_events(junk), b"\xff not json")
    await bus.js.publish(subjects.task_events(junk), b"[1, 2]")
    tid, skill = ev.new_id(), "recover" + ev.new_id()[:8]
    await bus.ledger.append(ev.TaskSubmitted(
        id=f"{tid}-submitted", subject=tid, data=ev.TaskSubmittedData(goal="x",
                                                                     workflow=skill)))
    nc = await connect(bus.url)
    orch = Orchestrator(nc, jetstream(nc), model=SimModel(), use_registry=False,
                        settings=OrchestratorSettings(tick_s=3600))
    orch.workflows.add(unserved_flow(skill))
    await orch.start()
    try:
        async def planned() -> bool:
            return any(isinstance(e.event, ev.TaskPlanned) for e in await bus.ledger.read(tid))
        await until(planned, "the unfinished task to be recovered", timeout=30)
    finally:
        await orch.stop()
        await nc.close()
    assert fold(tid, await bus.ledger.read(tid)).status is TaskStatus.WORKING


async def test_show_says_which_steps_wait_for_an_agent(make_mesh, bus) -> None:  # noqa: F811
    mesh = await echo_mesh(make_mesh)
    skill = "showwait" + ev.new_id()[:8]
    mesh.orchestrator.workflows.add(unserved_flow(skill))
    tid = await mesh.client.submit("x", workflow=skill)

    async def queued() -> bool:
        state = await mesh.client.state(tid)
        return "only" in state.steps and state.steps["only"].dispatched_at is not None
    await until(queued, "the step to be queued")
    out = await asyncio.to_thread(_cli, "show", tid, url=bus.url)
    assert out.returncode == 0, out.stderr
    assert f"waiting for an agent offering skill {skill} since" in " ".join(out.stdout.split())


# ---------------------------------------------------------------- (9) cheap and timely


async def test_rejecting_an_invalid_submission_reads_nothing(make_mesh, bus) -> None:  # noqa: F811
    mesh = await echo_mesh(make_mesh)
    ids = [f"cheap-{ev.new_id()[:12]}" for _ in range(5)]
    for tid in ids:
        await raw_submit(bus.js, {"task_id": tid, "goal": 5})
    await raw_submit(bus.js, b"not json")
    states = await asyncio.gather(*(mesh.client.result(t, timeout=20) for t in ids))
    assert all(st.status is TaskStatus.REJECTED for st in states)
    await until(lambda: submit_consumer_idle(bus.js), "the submit consumer to settle")
    # (recovery may be reading other tests' tasks meanwhile)
    assert [t for t in mesh.reads if t in ids] == []


async def test_a_slow_timer_drive_does_not_hold_up_the_others(bus) -> None:
    """Timers ran late under load: the ticker drove due tasks one after another, so one
    slow drive held up every timer behind it."""
    nc = await connect(bus.url)
    orch = Orchestrator(nc, jetstream(nc), model=SimModel(), use_registry=False,
                        settings=OrchestratorSettings(tick_s=3600))
    stuck, driven = asyncio.Event(), asyncio.Event()

    async def drive(task_id: str, **kwargs: object):
        if task_id == "slow":
            await stuck.wait()
        else:
            driven.set()

    orch.drive = drive  # type: ignore[method-assign,assignment]
    past = ev.utcnow()
    orch.cache.waiting.update({"slow": past, "quick": past})
    ticking = asyncio.create_task(orch._tick())
    try:
        await asyncio.wait_for(driven.wait(), 5)
    finally:
        stuck.set()
        await ticking
        await orch.stop()
        await nc.close()


# ---------------------------------------------------------------- (7) the step's holder


async def test_the_orchestrator_ignores_a_result_not_written_by_the_steps_holder(bus) -> None:
    """w2 claimed the step; w1's result, appended around the fence (unfenced), is
    delivered to the orchestrator, which must not complete the task with it."""
    nc = await connect(bus.url)
    orch = Orchestrator(nc, jetstream(nc), model=SimModel(), use_registry=False,
                        settings=OrchestratorSettings(tick_s=3600))
    try:
        tid, skill = ev.new_id(), "holder" + ev.new_id()[:8]
        orch.workflows.add(unserved_flow(skill))
        await orch.ledger.append(ev.TaskSubmitted(
            id=f"{tid}-submitted", subject=tid,
            data=ev.TaskSubmittedData(goal="x", workflow=skill)))
        await orch.drive(tid)
        claim = await orch.ledger.append(ev.StepStarted(subject=tid, data=ev.StepStartedData(
            step_id="only", agent="w", worker="w2", delivery=2)), expected_last_subject_seq=0)
        await orch.ledger.append(ev.StepCompleted(subject=tid, data=ev.StepCompletedData(
            step_id="only", agent="w", worker="w1", output={"by": "zombie"})))
        state = await orch.drive(tid)
        assert state.status is TaskStatus.WORKING
        assert [i.reason for i in state.ignored] == ["written by w1, not the step's holder w2"]
        last = state.steps["only"].last_seq
        assert last > claim
        await orch.ledger.append(ev.StepCompleted(subject=tid, data=ev.StepCompletedData(
            step_id="only", agent="w", worker="w2", output={"by": "holder"})),
            expected_last_subject_seq=last)
        state = await orch.drive(tid)
        assert state.status is TaskStatus.COMPLETED
        assert state.result == {"steps": {"only": {"by": "holder"}}, "output": {"by": "holder"}}
    finally:
        await orch.stop()
        await nc.close()


def plan_echo(request: ModelRequest) -> str:
    """A scripted planner: one echo step."""
    if request.output_schema is not None:
        return json.dumps({"steps": [{"id": "e", "skill": "edge_echo",
                                      "input": {"text": "planned"}}], "merge": False})
    return "merged"


async def test_a_stale_view_does_not_leave_skills_out_of_an_llm_plan(make_mesh) -> None:  # noqa: F811
    """With the view stale, the planner was told no skill is live: "no live agent offers
    any skill to plan with", and the task failed with its agent alive."""
    mesh = await make_mesh([ECHO], planner=FunctionModel(plan_echo, name="edge-planner"))
    await stale_view(mesh.orchestrator)
    tid = await mesh.client.submit("echo something")
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, (state.code, state.reason)
    assert state.steps["e"].output == {"echoed": "planned"}


async def test_a_different_resubmission_through_the_client_is_refused(bus) -> None:
    """Client.submit sets Nats-Msg-Id to the task id, so within JetStream's duplicate
    window a different submission with the same id never reached the orchestrator: it
    was dropped silently."""
    from jetmesh.orchestrator.client import Client, TaskExists

    async with Client(bus.url) as client:
        tid = await client.submit("first", workflow="edge-echo", task_id=ev.new_id())
        assert await client.submit("first", workflow="edge-echo", task_id=tid) == tid
        with pytest.raises(TaskExists):
            await client.submit("second", workflow="edge-echo", task_id=tid)


async def test_two_ends_decided_at_once_store_one(bus) -> None:
    """Two replicas (or a stale fold) decide different ends of one task at the same
    time: the second is dropped (one id for every end), the task has one terminal event."""
    from jetmesh.orchestrator import decide as d
    from jetmesh.orchestrator.service import end_id

    nc = await connect(bus.url)
    orch = Orchestrator(nc, jetstream(nc), model=SimModel(), use_registry=False,
                        settings=OrchestratorSettings(tick_s=3600))
    try:
        tid, skill = ev.new_id(), "ends" + ev.new_id()[:8]
        orch.workflows.add(unserved_flow(skill))
        await orch.ledger.append(ev.TaskSubmitted(
            id=f"{tid}-submitted", subject=tid,
            data=ev.TaskSubmittedData(goal="x", workflow=skill)))
        stale = await orch.drive(tid)
        assert stale.status is TaskStatus.WORKING
        # Another replica cancels it meanwhile; this one, not knowing, fails it.
        await orch.ledger.append(ev.TaskCanceled(
            id=end_id(tid), subject=tid, source="jetmesh/orchestrator",
            data=ev.TaskCanceledData(reason="by the other replica")))
        await orch.effects.execute(stale, [d.Fail("step_failed", "this replica's view")], [])
        ends = [e.event for e in await orch.ledger.read(tid)
                if isinstance(e.event, ev.TERMINAL_TASK_EVENTS)]
        assert [e.type for e in ends] == ["jetmesh.task.canceled.v1"]
        assert orch.cache[tid].state.status is TaskStatus.CANCELED
    finally:
        await orch.stop()
        await nc.close()
