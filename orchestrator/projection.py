"""A projection of all tasks (state, last update, cost so far) for listings."""

from __future__ import annotations

from collections import defaultdict

from jetmesh.bus import subjects
from jetmesh.bus.ledger import Ledger, LedgerEntry, decode_entry
from jetmesh.orchestrator.state import TaskState, fold


async def all_tasks(ledger: Ledger, *, limit: int | None = None) -> list[TaskState]:
    """Every task in the ledger, newest first. Reads the whole stream: for listings."""
    by_task: dict[str, list[LedgerEntry]] = defaultdict(list)
    for seq, subject, data in await ledger.read_raw(subjects.ALL_LEDGER):
        got = decode_entry(seq, subject, data)  # one bad message must not stop a listing
        if isinstance(got, LedgerEntry):
            by_task[got.event.subject].append(got)
        else:
            ledger.report_bad(got)
    states = [fold(task_id, entries) for task_id, entries in by_task.items()]
    states.sort(key=lambda s: s.last_seq, reverse=True)
    return states[:limit] if limit else states
