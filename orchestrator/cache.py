"""The orchestrator's task cache: each task's fold, its cursors on the ledger, and the
per-task bookkeeping of drives (locks, queued drives, delivered results, timers).

A fold advances one way: `Fold.take`, whatever the entry's origin (a ledger read, a
step result as its consumer delivered it, one of the orchestrator's own appends, or an
event folded before it is appended). The cursors say what the ledger has given us, so
no event is folded twice and a later read starts where the last one ended.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import Appended, LedgerEntry, is_log_seq, subject_for
from jetmesh.bus.ledger_port import TaskLedger
from jetmesh.orchestrator.state import TaskState, apply

log = logging.getLogger("jetmesh.orchestrator")


class Origin(Enum):
    """Where an entry folded into the cache comes from."""

    READ = "read"
    """The ledger, read in stream order: moves the cursors."""
    LOCAL = "local"
    """Stored, but not read back: a delivered step result or our own append (its
    sequence is kept, so the read that brings it again skips it)."""
    PENDING = "pending"
    """Not stored yet: folded now, appended with the next batch (`Fold.stored`)."""


@dataclass
class Fold:
    """A task's fold, what has been read of the ledger, and what was folded from our own
    appends and deliveries beyond that (so a later read does not fold them twice)."""

    state: TaskState
    cursor: int = 0
    log_cursor: int = 0
    """The highest log record (stream JM_LOG, `LOG_SEQ_BASE` up) folded, if the logs are read."""
    local: set[int] = field(default_factory=set)
    control_seq: int = 0
    """The last sequence of the task's control subject (cancel, approvals) in the fold."""
    unread: bool = False
    """Step results were folded from their deliveries since the last read: the fold may
    lack a control message stored before them (see `Orchestrator._drive`)."""

    def take(self, entry: LedgerEntry, origin: Origin = Origin.READ) -> bool:
        """Fold one entry in (the one way the fold advances); False if it was folded
        already and is skipped."""
        seq = entry.seq
        if origin is Origin.PENDING:
            apply(self.state, entry, check_seq=False)
            return True
        if origin is Origin.READ and is_log_seq(seq):
            apply(self.state, entry, check_seq=False)
            self.log_cursor = max(self.log_cursor, seq)
            return True
        if (seq <= self.cursor and origin is Origin.LOCAL) or seq in self.local:
            fresh = False
        else:
            apply(self.state, entry, check_seq=False)
            fresh = True
            if origin is Origin.LOCAL:
                self.local.add(seq)
        self._seen(entry.subject, seq)
        if origin is Origin.READ:
            self.cursor = seq
        return fresh

    def stored(self, ack: Appended) -> None:
        """An event folded before its append (`Origin.PENDING`) got its sequence."""
        self.state.last_seq = max(self.state.last_seq, ack.seq)
        if ack.seq > self.cursor:
            self.local.add(ack.seq)
        self._seen(ack.subject, ack.seq)

    def _seen(self, subject: str, seq: int) -> None:
        if subject == subjects.task_control(self.state.task_id):
            self.control_seq = max(self.control_seq, seq)

    def reset(self) -> None:
        """Forget everything folded: the next read starts from the task's first event."""
        self.state = TaskState(task_id=self.state.task_id)
        self.cursor = self.log_cursor = self.control_seq = 0
        self.local = set()

    def read_done(self) -> None:
        self.unread = False
        self.local = {s for s in self.local if s > self.cursor}


@dataclass(frozen=True)
class Delivered:
    """A step's result as its consumer delivered it, and the line sequence its append
    was fenced on (`Nats-Expected-Last-Subject-Sequence`): the event before it on the
    step's line, which tells whether the cached fold has every event of that line."""

    entry: LedgerEntry
    after: int


def logs_unused(state: TaskState) -> bool:
    """Whether the orchestrator may leave the steps' logs out of its fold of this task.

    It acts on results, claims, control and its own events, never on a step's model
    and read-only tool calls, except to split what is left of a dollar budget among the
    open steps (their cost). So once the task is known to have no dollar budget its
    reads skip the logs (9 of the fan-out task's 21 step events), and the usage counters
    of its fold (cost, tokens, calls) stay partial; `jetmesh show` and the client read
    everything."""
    sub = state.submitted
    return sub is not None and (sub.budget is None or sub.budget.max_usd is None)


def follows_on(fold: Fold, delivered: list[Delivered]) -> list[LedgerEntry] | None:
    """The delivered step results to fold, if their lines follow on from the fold; None
    (fold nothing) sends the drive to the ledger instead.

    Each result's line must go on from the cached fold: the sequence its append was
    fenced on is the last event of that line the fold has (a claim, a side effect or
    a result the fold has not seen means a read). Other steps' lines may be behind;
    that only delays what their own deliveries will bring. A control message (a
    cancel, an approval) stored before the result may be missing too, as it comes on
    another consumer: the drive then reads before any decision but completing the
    task, and completes only on the condition that the control subject is as the fold
    has it. Results already folded (a redelivery, or a read took them) are skipped."""
    state = fold.state
    lines: dict[str, int] = {}
    out: list[LedgerEntry] = []
    for got in sorted(delivered, key=lambda x: x.entry.seq):
        seq, event = got.entry.seq, got.entry.event
        if seq <= fold.cursor or seq in fold.local:
            continue
        if not isinstance(event, ev.StepCompleted | ev.StepFailed):
            return None
        st = state.steps.get(event.data.step_id)
        if st is None or got.after != lines.get(st.id, st.last_seq):
            return None
        lines[st.id] = seq
        out.append(got.entry)
    return out


def report_ignored(state: TaskState, before: int) -> None:
    """Log the events the fold just ignored (not the step holder's, steps never
    dispatched): they are kept in the ledger, and listed by `jetmesh show`."""
    if state.ignored_count <= before:
        return
    for ign in state.ignored[before:before + 3]:
        log.warning("task %s: ignored ledger event %d (%s%s): %s", state.task_id, ign.seq,
                    ign.type, f", step {ign.step_id}" if ign.step_id else "", ign.reason)
    if state.ignored_count - before > 3:
        log.warning("task %s: %d more ignored events", state.task_id,
                    state.ignored_count - before - 3)


def pending_entry(event: ev.Event) -> LedgerEntry:
    """An event not stored yet, as a ledger entry (sequence 0) to fold as PENDING."""
    return LedgerEntry(0, subject_for(event), event)


class TaskCache:
    """Folds of recently driven tasks (least recently used out), and per task: its
    drive lock, the drive queued on it, delivered results, and when to drive it again."""

    def __init__(self, ledger: TaskLedger, size: int = 10_000) -> None:
        self.ledger = ledger
        self.size = size
        self._folds: OrderedDict[str, Fold] = OrderedDict()
        self.locks: dict[str, asyncio.Lock] = {}
        self.queued: dict[str, asyncio.Future[TaskState]] = {}
        """A drive of the task waiting for its lock (it has not read yet)."""
        self.inbox: dict[str, list[Delivered]] = {}
        """Step results delivered for a task and not yet taken by a drive of it."""
        self.waiting: dict[str, datetime | None] = {}
        """Open tasks by when a timer should drive them (None: only an event will)."""

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._folds

    def __getitem__(self, task_id: str) -> Fold:
        return self._folds[task_id]

    def get(self, task_id: str) -> Fold | None:
        return self._folds.get(task_id)

    def forget(self, task_id: str) -> None:
        self._folds.pop(task_id, None)

    def clear(self) -> None:
        self._folds.clear()

    def lock(self, task_id: str) -> asyncio.Lock:
        return self.locks.setdefault(task_id, asyncio.Lock())

    def deliver(self, task_id: str, delivered: Delivered) -> None:
        self.inbox.setdefault(task_id, []).append(delivered)

    def _remember(self, task_id: str, fold: Fold) -> None:
        self._folds[task_id] = fold
        while len(self._folds) > self.size:
            old, _ = self._folds.popitem(last=False)
            self.inbox.pop(old, None)
            lock = self.locks.get(old)
            if lock is not None and not lock.locked():
                del self.locks[old]
            self.waiting.pop(old, None)

    async def load(self, task_id: str, delivered: list[Delivered] | None = None
                   ) -> TaskState:
        """The task's state: the cached fold plus whatever the ledger has that is newer.

        A terminal task is answered from the cache with no read: nothing can change it.
        `delivered`: step results its consumer delivered since the last drive; when they
        follow on from the cached fold (`follows_on`) they are folded in, no read.
        """
        fold = self._folds.get(task_id)
        if fold is None:
            fold = Fold(TaskState(task_id=task_id))
            self._remember(task_id, fold)
        else:
            self._folds.move_to_end(task_id)
            if fold.state.terminal:
                return fold.state
            before = fold.state.ignored_count
            entries = follows_on(fold, delivered) \
                if delivered and logs_unused(fold.state) else None
            if entries is not None:
                for entry in entries:
                    fold.take(entry, Origin.LOCAL)
                fold.unread = True
                report_ignored(fold.state, before)
                return fold.state
        # Before its submission is folded a task's logs are not read (a new task has
        # none: one request, not two). If the fold then shows they count (a dollar
        # budget: an orchestrator restarted mid-task), it is folded again from the
        # start with them, in the merged order.
        skip_logs = logs_unused(fold.state) or fold.state.submitted is None
        ignored = fold.state.ignored_count
        for entry in await self.ledger.read(task_id, from_seq=fold.cursor + 1,
                                            without_logs=skip_logs,
                                            after_log=fold.log_cursor):
            fold.take(entry)
        if skip_logs and fold.state.submitted is not None \
                and not logs_unused(fold.state):
            fold.reset()
            ignored = 0
            for entry in await self.ledger.read(task_id):
                fold.take(entry)
        fold.read_done()
        report_ignored(fold.state, ignored)
        return fold.state
