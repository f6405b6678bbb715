"""The ledger against a real nats-server: append, dedupe, fencing, follow, crash safety."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.errors import AppendConflict, InvalidEventError
from jetmesh.bus.ledger import Ledger, is_log_seq
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams


def started(task: str, step: str = "s1", n: int = 0) -> ev.StepStarted:
    return ev.StepStarted(
        subject=task, data=ev.StepStartedData(step_id=step, agent="a", worker=f"w{n}")
    )


async def test_append_and_read_back_in_order(bus) -> None:
    task = ev.new_id()
    sub = ev.TaskSubmitted(subject=task, data=ev.TaskSubmittedData(goal="hello"))
    s1 = await bus.ledger.append(sub)
    s2 = await bus.ledger.append(started(task))
    entries = await bus.ledger.read(task)
    assert [e.seq for e in entries] == [s1, s2]
    assert entries[0].event == sub
    assert entries[0].subject == subjects.task_events(task)
    assert entries[1].subject == subjects.step_events(task, "s1")
    assert await bus.ledger.read(ev.new_id()) == []


async def test_a_read_without_logs_has_everything_but_the_steps_logs_in_order(bus) -> None:
    task = ev.new_id()
    sub = ev.TaskSubmitted(subject=task, data=ev.TaskSubmittedData(goal="hello"))
    call = ev.ModelCalled(subject=task, data=ev.ModelCalledData(
        step_id="s1", agent="a", provider="sim", model="m", response={}))
    lookup = ev.ToolCalled(subject=task, data=ev.ToolCalledData(
        step_id="s1", agent="a", tool="t", call_id="c1", idempotency_key="k1"))
    done = ev.StepCompleted(subject=task, data=ev.StepCompletedData(
        step_id="s1", agent="a", output={"ok": True}))
    cancel = ev.CancelRequested(subject=task, data=ev.CancelRequestedData(reason="r"))
    seqs = [await bus.ledger.append(e) for e in
            (sub, started(task), call, lookup, done, cancel)]
    everything = await bus.ledger.read(task)
    assert [e.seq for e in everything] == seqs
    assert {e.subject for e in everything[2:4]} == {subjects.step_log(task, "s1")}
    decisions = await bus.ledger.read(task, without_logs=True)
    assert [e.seq for e in decisions] == [seqs[0], seqs[1], seqs[4], seqs[5]]
    assert [type(e.event) for e in decisions] == [
        ev.TaskSubmitted, ev.StepStarted, ev.StepCompleted, ev.CancelRequested]
    assert [is_log_seq(x) for x in seqs] == [False, False, True, True, False, False]
    later = await bus.ledger.read(task, from_seq=seqs[1] + 1, without_logs=True)
    assert [e.seq for e in later] == [seqs[4], seqs[5]]


async def test_duplicate_event_id_is_stored_once(bus) -> None:
    task = ev.new_id()
    e = ev.TaskSubmitted(subject=task, data=ev.TaskSubmittedData(goal="x"))
    first = await bus.ledger.append(e)
    again = await bus.ledger.append(e)
    assert first == again
    assert len(await bus.ledger.read(task)) == 1


async def test_concurrent_fenced_appends_exactly_one_wins(bus) -> None:
    task = ev.new_id()
    base = await bus.ledger.append(started(task))
    results = await asyncio.gather(
        *(bus.ledger.append(started(task, n=i), expected_last_subject_seq=base)
          for i in range(2)),
        return_exceptions=True,
    )
    wins = [r for r in results if isinstance(r, int)]
    losses = [r for r in results if isinstance(r, AppendConflict)]
    assert len(wins) == 1 and len(losses) == 1
    assert losses[0].subject == subjects.step_events(task, "s1")
    assert len(await bus.ledger.read(task)) == 2


async def test_first_append_on_subject_with_expected_zero(bus) -> None:
    task = ev.new_id()
    await bus.ledger.append(started(task), expected_last_subject_seq=0)
    with pytest.raises(AppendConflict):
        await bus.ledger.append(started(task, n=1), expected_last_subject_seq=0)


async def test_invalid_event_is_refused_with_reasons_and_not_written(bus) -> None:
    task = ev.new_id()
    bad = {"type": "jetmesh.step.started.v1", "subject": task, "data": {"agent": "a"}}
    with pytest.raises(InvalidEventError) as info:
        await bus.ledger.append(bad)  # type: ignore[arg-type]
    locs = {tuple(e["loc"]) for e in info.value.errors}
    assert any("step_id" in loc for loc in locs), info.value.errors
    assert any("worker" in loc for loc in locs), info.value.errors
    with pytest.raises(InvalidEventError):
        await bus.ledger.append({"type": "jetmesh.nope.v1", "subject": task})  # type: ignore[arg-type]
    bad_subject = started(task).model_copy(update={"subject": "a.b.>"})
    with pytest.raises(InvalidEventError):
        await bus.ledger.append(bad_subject)
    assert await bus.ledger.read(task) == []


async def test_follow_survives_a_dropped_connection_without_gap_or_duplicate(bus) -> None:
    task = ev.new_id()
    total = 1000
    appended: list[int] = []

    async def writer() -> None:
        for i in range(0, total, 50):
            appended.extend(await bus.ledger.append_many(
                [started(task, step=f"s{i + j}") for j in range(50)]
            ))

    seen: list[int] = []
    dropped = asyncio.Event()

    async def first_reader() -> None:
        nc = await connect(bus.url)
        ledger = Ledger(nc, jetstream(nc))
        async for entry in ledger.follow(task):
            seen.append(entry.seq)
            if len(seen) == 300:
                break
        await nc.close()  # the connection drops mid-stream
        dropped.set()

    w = asyncio.create_task(writer())
    await asyncio.wait_for(first_reader(), 30)
    assert dropped.is_set()
    nc2 = await connect(bus.url)
    ledger2 = Ledger(nc2, jetstream(nc2))
    try:
        async def resume() -> None:
            async for entry in ledger2.follow(task, from_seq=seen[-1] + 1):
                seen.append(entry.seq)
                if len(seen) == total:
                    return
        await asyncio.wait_for(resume(), 30)
    finally:
        await nc2.close()
    await w
    assert len(seen) == total
    assert len(set(seen)) == total, "an event arrived twice"
    assert seen == sorted(appended), "an event is missing or out of order"


async def test_kill_9_during_a_burst_loses_no_acknowledged_append(fresh_server: EmbeddedNats
                                                               ) -> None:
    nc = await connect(fresh_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.05)
    js = jetstream(nc)
    await declare_streams(js)
    ledger = Ledger(nc, js, timeout_s=1.0)
    task = ev.new_id()
    acked: dict[str, int] = {}
    killed = asyncio.Event()

    async def burst() -> None:
        i = 0
        while len(acked) < 400:
            e = started(task, step=f"s{i}")
            i += 1
            try:
                acked[e.id] = await ledger.append(e)
            except Exception:
                continue  # unacknowledged: may or may not be stored, either is fine
            if len(acked) == 150 and not killed.is_set():
                fresh_server.kill()
                killed.set()
                await asyncio.to_thread(fresh_server.start)

    await asyncio.wait_for(burst(), 60)
    assert killed.is_set()
    stored = {entry.event.id: entry.seq for entry in await ledger.read(task)}
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged appends lost"
    for event_id, seq in acked.items():
        assert stored[event_id] == seq
    with contextlib.suppress(Exception):
        await nc.close()


async def test_a_pipelined_append_conditioned_on_another_subject(bus) -> None:
    """`expect`: stored only if the other subject's last sequence is as given; a refusal
    is raised (not left hanging, as nats-py's publish_async would), after the rest of
    the batch is stored."""
    task = ev.new_id()
    control = subjects.task_control(task)

    def batch() -> list[ev.Event]:
        return [ev.TaskSubmitted(subject=task, data=ev.TaskSubmittedData(goal="x")),
                ev.TaskCompleted(subject=task, data=ev.TaskCompletedData(result={}))]

    acks = await bus.ledger.append_pipelined(batch(), expect=[None, (control, 0)])
    assert [a.seq for a in acks] == sorted(a.seq for a in acks) and len(acks) == 2
    cancel = await bus.ledger.append(ev.CancelRequested(
        subject=task, data=ev.CancelRequestedData(reason="stop")))
    with pytest.raises(AppendConflict):
        await asyncio.wait_for(
            bus.ledger.append_pipelined(batch(), expect=[None, (control, cancel - 1)]), 3)
    types = [e.event.type for e in await bus.ledger.read(task)]
    assert types.count("jetmesh.task.completed.v1") == 1  # the refused one is not stored
    assert types.count("jetmesh.task.submitted.v1") == 2  # the unconditioned one is
    acks = await bus.ledger.append_pipelined(batch(), expect=[None, (control, cancel)])
    assert len(acks) == 2
