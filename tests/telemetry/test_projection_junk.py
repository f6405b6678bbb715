"""A value in jm-stats or jm-tasks that is not a record (another writer, a bad upgrade)
is left out with a warning; every readable record is still counted and listed."""

from __future__ import annotations

import logging

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import LedgerEntry
from jetmesh.bus.presence import ensure_bucket
from jetmesh.orchestrator import stats, tasks_kv
from jetmesh.orchestrator.state import fold

JUNK = [b"not json", b"[1, 2]", b'{"task_id": "x"}', b'{"task_id": 1, "status": []}',
        b'{"task_id": "y", "status": "completed", "ended_at": "yesterday"}']


def _entries(task_id: str) -> list[LedgerEntry]:
    events: list[ev.Event] = [
        ev.TaskSubmitted(subject=task_id, data=ev.TaskSubmittedData(goal="g")),
        ev.TaskCompleted(subject=task_id, data=ev.TaskCompletedData(result={"ok": True}))]
    return [LedgerEntry(i + 1, subjects.task_events(task_id), e) for i, e in enumerate(events)]


async def test_unreadable_records_are_left_out_and_the_rest_counted(fresh_server,
                                                                    caplog) -> None:
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    try:
        skv = await ensure_bucket(js, subjects.BUCKET_STATS)
        tkv = await ensure_bucket(js, subjects.BUCKET_TASKS)
        good = [f"good-{i}" for i in range(3)]
        for tid in good:
            entries = _entries(tid)
            await stats.put_summary(js, stats.task_summary(tid, entries), kv=skv)
            summary = tasks_kv.summarize(fold(tid, entries))
            await tkv.put(tasks_kv.task_key(tid), summary.model_dump_json().encode())
        for i, junk in enumerate(JUNK):
            await skv.put(f"task.junk{i}", junk)
            await tkv.put(f"task.junk{i}", junk)

        with caplog.at_level(logging.WARNING):
            records = await stats.read_summaries(js)
            rows = await tasks_kv.read_summaries(js)
        assert sorted(r["task_id"] for r in records) == good
        assert stats.aggregate(records)["all"]["tasks"] == 3
        # The last junk value is a task summary's shape (a listing shows it as one).
        assert sorted(s.task_id for s in rows) == [*good, "y"]
        said = caplog.text
        for i in range(len(JUNK)):
            assert f"jm-stats: record task.junk{i} is not readable" in said
        for i in range(len(JUNK) - 1):
            assert f"jm-tasks: task.junk{i} is not a task summary" in said
    finally:
        await nc.close()
