"""Hostile input against every consumer of a running mesh (issue 14, items 4, 5 and 9).

Hypothesis draws arbitrary bytes and arbitrary JSON (nested thousands deep, lone
surrogates in ids, NaN and 1e300, wrong shapes, step commands with random fields) and
publishes them on every subject a consumer reads: the submit subject, a skill's work
subject, and a task's control, step and events subjects, both of unknown tasks and of
a finished one. Then:

- every consumer settles every message (nothing pending, nothing waiting for an ack):
  each ended acked with an outcome or dead-lettered, never delivered past max_deliver;
- no role stopped: the orchestrator's and the worker's loops are still running, and a
  valid task submitted afterwards completes;
- the finished task is still readable, still completed, with exactly one terminal event.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter
from jetmesh.bus.events import MAX_MESSAGE_BYTES
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.testing import Mesh as HarnessMesh
from jetmesh.orchestrator.testing import start_mesh

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20)


def deep(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"task_id": "t", "input": ' + b'{"a":' * depth + b"1" + b"}" * depth + b"}"


RAW = st.one_of(
    st.binary(max_size=300),
    st.builds(deep, st.integers(100, 5000), st.sampled_from(["list", "dict"])),
    st.sampled_from([
        b'{"task_id": "\\ud800", "goal": "x"}',
        b'{"task_id": "ok", "goal": "\\udfff\\ud800"}',
        b'{"task_id": "n", "input": {"x": NaN}}',
        b'{"task_id": "n", "input": {"x": Infinity, "y": -Infinity}}',
        b'{"task_id": "big", "input": {"x": 1e300, "y": 1e999}}',
        b'{"specversion": "1.0", "type": "jetmesh.task.completed.v1", "data": {}}',
        b'{"specversion": "1.0", "id": "x", "source": "s", "subject": "\\ud800",'
        b' "type": "jetmesh.step.completed.v1", "data": {"step_id": "s1"}}',
        b"\xff\xfe\x00",
        b"",
        b"null", b"[]", b"0", b'"a string"',
    ]),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"task_id": st.text(max_size=30), "step_id": st.text(max_size=10),
                           "skill": st.sampled_from(["order_status", "lookup_order", "x"]),
                           "input": JSON}).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"task_id": st.text(max_size=30), "goal": st.text(max_size=30),
                           "workflow": st.sampled_from(["support", "nope", ""])}
                          ).map(lambda v: json.dumps(v).encode()),
)


class Mesh:
    """The harness's mesh (jetmesh.orchestrator.testing) and a task that completed on it."""

    def __init__(self, mesh: HarnessMesh, victim: str) -> None:
        self.orch: Orchestrator = mesh.orchestrator
        self.worker: Worker = mesh.workers[0]
        self.client: Client = mesh.client
        self.victim = victim


@pytest.fixture(scope="module")
async def mesh(bus):
    h = await start_mesh(["support"], url=bus.url, worker_model=SimModel(),
                         settings=OrchestratorSettings(tick_s=0.1))
    try:
        victim = await h.client.submit("where is A1002?", workflow="fanout",
                                       input={"order_ids": ["A1001", "A1002", "A1003"]})
        assert (await h.client.result(victim, timeout=60)).status is TaskStatus.COMPLETED
        yield Mesh(h, victim)
    finally:
        await h.stop()


CONSUMERS = [
    (subjects.STREAM_TASKS, subjects.CONSUMER_ORCH_SUBMIT),
    (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_STEPS),
    (subjects.STREAM_LEDGER, subjects.CONSUMER_ORCH_CONTROL),
    (subjects.STREAM_WORK, subjects.work_consumer("order_status")),
    (subjects.STREAM_WORK, subjects.work_consumer("refund")),
]


async def settled(bus, timeout: float = 90.0) -> None:
    """Until every consumer has nothing pending and nothing waiting for an ack."""
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for stream, name in CONSUMERS:
            try:
                info = await bus.js.consumer_info(stream, name)
            except Exception:  # a consumer this version does not have
                continue
            if info.num_pending or info.num_ack_pending:
                busy.append((name, info.num_pending, info.num_ack_pending))
        if not busy:
            return
        assert time.monotonic() < deadline, f"consumers never settled: {busy}"
        await asyncio.sleep(0.1)  # polled: consumer state signals nothing


def targets(victim: str) -> list[str]:
    other = ev.new_id()
    return [subjects.SUBMIT, subjects.work("order_status"), subjects.work("refund"),
            subjects.task_control(other), subjects.step_events(other, "s1"),
            subjects.task_events(other), subjects.task_control(victim),
            subjects.step_events(victim, "order0"), subjects.task_events(victim)]


@settings(max_examples=4, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(payloads=st.lists(RAW, min_size=10, max_size=25))
async def test_hostile_input_never_stops_a_consumer_or_a_role(bus, mesh, payloads) -> None:
    subs = targets(mesh.victim)
    for i, data in enumerate(payloads):
        if len(data) > MAX_MESSAGE_BYTES - 1024:
            continue
        await bus.js.publish(subs[i % len(subs)], data)
    await settled(bus)
    # No role stopped.
    assert all(not t.done() for t in mesh.orch._tasks if t.get_name() != "orchestrator-recover")
    for runner in mesh.worker._runners:
        assert runner._loop_task is not None and not runner._loop_task.done()
    # Valid work still completes.
    tid = await mesh.client.submit("where is A1003?", workflow="fanout",
                                   input={"order_ids": ["A1003", "A1001", "A1002"]})
    assert (await mesh.client.result(tid, timeout=60)).status is TaskStatus.COMPLETED
    # The finished task is still readable and still finished exactly once.
    state = await mesh.client.state(mesh.victim)
    assert state.status is TaskStatus.COMPLETED
    ends = [e for e in await mesh.client.events(mesh.victim)
            if isinstance(e.event, ev.TERMINAL_TASK_EVENTS)]
    assert len(ends) == 1, ends


async def test_no_dead_letter_was_delivered_past_max_deliver(bus, mesh) -> None:
    """Runs after the property test (same module mesh): every letter kept says how many
    deliveries it took, and none took more than the consumer allows."""
    seq, letters = 0, []
    while True:
        try:
            m = await bus.js.get_msg(subjects.STREAM_DLQ, seq=seq + 1, next=True,
                                     subject=subjects.ALL_DLQ)
        except Exception:
            break
        seq = m.seq
        try:  # (other tests leave malformed letters on purpose)
            letters.append(DeadLetter.model_validate_json(m.data))
        except ValueError:
            continue
    assert letters, "the hostile input left no dead letters at all"
    limit = mesh.worker.bus_settings.max_deliver
    over = [dl for dl in letters if dl.deliveries > limit + 1]
    assert over == [], over
