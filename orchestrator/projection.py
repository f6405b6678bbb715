"""A projection of all tasks (state, last update, cost so far) for listings."""

from __future__ import annotations

from collections import defaultdict

from jetmesh.bus import subjects
from jetmesh.bus.events import decode_event
from jetmesh.bus.ledger import Ledger, LedgerEntry
from jetmesh.orchestrator.state import TaskState, fold


async def all_tasks(ledger: Ledger, *, limit: int | None = None) -> list[TaskState]:
    """Every task in the ledger, newest first. Reads the whole stream: for listings."""
    by_task: dict[str, list[LedgerEntry]] = defaultdict(list)
    for seq, subject, data in await ledger.read_raw(subjects.ALL_LEDGER):
        event = decode_event(data)
        by_task[event.subject].append(LedgerEntry(seq, subject, event))
    states = [fold(task_id, entries) for task_id, entries in by_task.items()]
    states.sort(key=lambda s: s.last_seq, reverse=True)
    return states[:limit] if limit else states
