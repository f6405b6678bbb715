"""The ledger port: what the orchestrator needs of a task's ledger (read, append, follow),
and `InMemoryLedger`, the stand-in for tests beside the real `bus.ledger.Ledger`.

The in-memory ledger keeps JetStream's rules that the orchestrator relies on: one
sequence per stored message, a task's events in stream order, an append with an id
already stored is a duplicate (its first sequence returned, nothing stored), a fenced
append is stored only if its subject's (or `expect`'s subject's) last sequence is the
one given (AppendConflict otherwise), and steps' logs numbered from `LOG_SEQ_BASE`.
Work commands published with a batch (`also`) are kept in `published`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.errors import AppendConflict
from jetmesh.bus.events import Event, encode_event
from jetmesh.bus.ledger import (
    LOG_SEQ_BASE,
    Appended,
    Entries,
    LedgerEntry,
    Skipped,
    decode_entry,
    is_log_seq,
    subject_for,
    validate_event,
)

__all__ = ["InMemoryLedger", "Published", "TaskLedger", "subject_matches"]


class TaskLedger(Protocol):
    """A task's ledger as the orchestrator uses it (`bus.ledger.Ledger` is the real one)."""

    def observe(self, task_id: str, seq: int) -> None: ...

    async def append(self, event: Event, *, expected_last_subject_seq: int | None = None,
                     validate: bool = True, data: bytes | None = None) -> int: ...

    async def append_many(self, events: Sequence[Event], *, validate: bool = True
                          ) -> list[int]: ...

    async def append_pipelined(
        self, events: Sequence[Event], *, validate: bool = True,
        also: Sequence[tuple[str, bytes, dict[str, str]]] = (),
        expect: Sequence[tuple[str, int] | None] = (),
    ) -> list[Appended]: ...

    async def read(
        self, task_id: str, *, from_seq: int = 1, subject: str | None = None,
        limit: int = 100_000, keep: Callable[[str], bool] | None = None,
        without_logs: bool = False, after_log: int = 0,
    ) -> Entries: ...

    async def read_raw(self, filter_subject: str, *, from_seq: int = 1, batch: int = 1000
                       ) -> list[tuple[int, str, bytes]]: ...

    def follow(
        self, task_id: str | None = None, *, from_seq: int = 1,
        filter_subject: str | None = None, idle_heartbeat_s: float = 2.0,
        on_bad: Callable[[Skipped], None] | None = None, logs: bool = False,
        after_log: int = 0,
    ) -> AsyncIterator[LedgerEntry]: ...


def subject_matches(filt: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    f, s = filt.split("."), subject.split(".")
    for i, tok in enumerate(f):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(f) == len(s)


@dataclass(frozen=True)
class Published:
    """A message published beside the events of a batch (a work command)."""

    subject: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class _Stored:
    seq: int
    subject: str
    data: bytes
    order: int
    """Arrival order across the ledger and the logs (their merged order)."""


class InMemoryLedger:
    """A ledger (and the steps' logs) held in memory, for one process."""

    def __init__(self) -> None:
        self._ledger: list[_Stored] = []
        self._logs: list[_Stored] = []
        self._ids: dict[str, int] = {}
        self._last: dict[str, int] = {}
        """Last ledger sequence per subject (the fences)."""
        self._order = 0
        self._version = 0
        """Bumped by every message stored (what a follower waits on)."""
        self._changed = asyncio.Condition()
        self.published: list[Published] = []
        self._published_ids: set[str] = set()
        self.reads = 0
        """How many reads were made (a test's measure of the orchestrator's reads)."""

    # ------------------------------------------------------------------ append

    def observe(self, task_id: str, seq: int) -> None:
        return None  # one copy: every read sees every append

    def _store(self, event: Event, fence: tuple[str, int] | None) -> Appended:
        subject = subject_for(event)
        if event.id in self._ids:
            return Appended(self._ids[event.id], True, subject)
        if fence is not None and self._last.get(fence[0], 0) != fence[1]:
            raise AppendConflict(fence[0], fence[1], "wrong last sequence")
        self._order += 1
        self._version += 1
        if subjects.is_step_log(subject):
            seq = LOG_SEQ_BASE + len(self._logs) + 1
            self._logs.append(_Stored(seq, subject, encode_event(event), self._order))
        else:
            seq = len(self._ledger) + 1
            self._ledger.append(_Stored(seq, subject, encode_event(event), self._order))
            self._last[subject] = seq
        self._ids[event.id] = seq
        return Appended(seq, False, subject)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def append(self, event: Event, *, expected_last_subject_seq: int | None = None,
                     validate: bool = True, data: bytes | None = None) -> int:
        if validate:
            event = validate_event(event)
        fence = None if expected_last_subject_seq is None else \
            (subject_for(event), expected_last_subject_seq)
        ack = self._store(event, fence)
        await self._notify()
        return ack.seq

    async def append_many(self, events: Sequence[Event], *, validate: bool = True
                          ) -> list[int]:
        return [a.seq for a in await self.append_pipelined(events, validate=validate)]

    async def append_pipelined(
        self, events: Sequence[Event], *, validate: bool = True,
        also: Sequence[tuple[str, bytes, dict[str, str]]] = (),
        expect: Sequence[tuple[str, int] | None] = (),
    ) -> list[Appended]:
        """Store each event (a refused condition does not stop the others; it is raised
        once all are done, as the real ledger does) and keep `also` in `published`."""
        conditions = list(expect) + [None] * (len(events) - len(expect))
        out: list[Appended] = []
        conflict: AppendConflict | None = None
        for e, cond in zip(events, conditions, strict=True):
            try:
                out.append(self._store(validate_event(e) if validate else e, cond))
            except AppendConflict as refused:
                conflict = conflict or refused
        for subject, data, h in also:
            msg_id = h.get(hn.MSG_ID)
            if msg_id is not None and msg_id in self._published_ids:
                continue
            if msg_id is not None:
                self._published_ids.add(msg_id)
            self.published.append(Published(subject, data, dict(h)))
        if also:
            self._version += 1
        await self._notify()
        if conflict is not None:
            raise conflict
        return out

    # ------------------------------------------------------------------ read

    def _of_task(self, task_id: str, from_seq: int, subject: str | None, without_logs: bool,
                 after_log: int) -> list[_Stored]:
        if subject is not None:
            rows = self._logs if subjects.is_step_log(subject) else self._ledger
            return [r for r in rows if r.subject == subject and (
                is_log_seq(r.seq) or r.seq >= from_seq)]
        rows = [r for r in self._ledger
                if r.seq >= from_seq and subjects.task_id_of(r.subject) == task_id]
        if not without_logs:
            rows += [r for r in self._logs
                     if r.seq > after_log and subjects.task_id_of(r.subject) == task_id]
        return sorted(rows, key=lambda r: r.order)

    async def read(
        self, task_id: str, *, from_seq: int = 1, subject: str | None = None,
        limit: int = 100_000, keep: Callable[[str], bool] | None = None,
        without_logs: bool = False, after_log: int = 0,
    ) -> Entries:
        self.reads += 1
        out = Entries()
        for r in self._of_task(task_id, from_seq, subject, without_logs, after_log)[:limit]:
            if keep is not None and not keep(r.subject):
                continue
            got = decode_entry(r.seq, r.subject, r.data)
            if isinstance(got, LedgerEntry):
                out.append(got)
            else:
                out.skipped.append(got)
        return out

    async def read_step(self, task_id: str, step_id: str, *, from_seq: int = 1) -> Entries:
        line, log = subjects.step_events(task_id, step_id), subjects.step_log(task_id, step_id)
        return await self.read(task_id, from_seq=from_seq,
                               keep=lambda s: s in (line, log))

    async def read_raw(self, filter_subject: str, *, from_seq: int = 1, batch: int = 1000
                       ) -> list[tuple[int, str, bytes]]:
        return [(r.seq, r.subject, r.data) for r in self._ledger
                if r.seq >= from_seq and subject_matches(filter_subject, r.subject)]

    async def follow(
        self, task_id: str | None = None, *, from_seq: int = 1,
        filter_subject: str | None = None, idle_heartbeat_s: float = 2.0,
        on_bad: Callable[[Skipped], None] | None = None, logs: bool = False,
        after_log: int = 0,
    ) -> AsyncIterator[LedgerEntry]:
        """Every matching entry from `from_seq` (with `logs`, the logs after `after_log`
        too), then each new one as it is appended; the caller breaks out."""
        filt = filter_subject or (subjects.task_all(task_id) if task_id
                                  else subjects.ALL_LEDGER)
        seen: set[int] = set()
        while True:
            version = self._version
            rows = [r for r in self._ledger
                    if r.seq >= from_seq and subject_matches(filt, r.subject)]
            if logs:
                rows += [r for r in self._logs
                         if r.seq > after_log and subject_matches(filt, r.subject)]
            new = [r for r in sorted(rows, key=lambda r: r.order) if r.order not in seen]
            for r in new:
                seen.add(r.order)
                got = decode_entry(r.seq, r.subject, r.data)
                if isinstance(got, LedgerEntry):
                    yield got
                elif on_bad is not None:
                    on_bad(got)
            async with self._changed:
                while self._version == version:
                    await self._changed.wait()

    def __repr__(self) -> str:
        return f"InMemoryLedger({len(self._ledger)} events, {len(self._logs)} log records)"
