"""Every event of a task carries the task's trace context (the root span's traceparent,
bus.tracecontext), continued from the submitter's when it sent one; so do the step
commands the orchestrator sends."""

from __future__ import annotations

from mesh_fixtures import make_mesh  # noqa: F401

from jetmesh.bus import subjects
from jetmesh.bus.tracecontext import parse_traceparent, task_traceparent
from jetmesh.orchestrator.state import TaskStatus

SUBMITTER = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def test_every_event_carries_the_tasks_trace_context(make_mesh) -> None:  # noqa: F811
    mesh = await make_mesh(["support"])
    for sent in (None, SUBMITTER, "00-not-a-traceparent"):
        tid = await mesh.client.submit("where?", workflow="fanout", traceparent=sent,
                                       input={"order_ids": ["A1001", "A1002", "A1003"]})
        state = await mesh.client.result(tid, timeout=60)
        assert state.status is TaskStatus.COMPLETED
        want = task_traceparent(tid, sent)
        sent = sent if parse_traceparent(sent) else None  # an invalid one is not kept
        entries = await mesh.client.events(tid)
        by_type: dict[str, set[str | None]] = {}
        for e in entries[1:]:  # the submission carries the submitter's own context
            by_type.setdefault(e.event.type, set()).add(e.event.traceparent)
        assert by_type and all(v == {want} for v in by_type.values()), by_type
        # ... or, when it sent none, the task's own: no event goes without one.
        assert entries[0].event.traceparent == (sent or want)
        if sent is not None:  # the submitter's trace continues
            assert parse_traceparent(want)[0] == parse_traceparent(sent)[0]
        # The step commands carried it too (the work stream keeps none after their ack,
        # so the workers' records show it: each step's line and log above).
        steps = {e.subject for e in entries if subjects.step_id_of(e.subject)}
        assert steps, "no step events"
