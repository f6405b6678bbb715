"""Task summaries and pending approvals as a projection kept in NATS KV (`jm-tasks`).

Listings (the dashboard's task list and approvals inbox, counts by state) read this
projection, never the ledger. Three parts:

* `summarize` (pure): one task's `TaskSummary` from its folded `TaskState` (plus the
  policy rules that asked for its pending approvals).
* `TaskProjector`: follows the whole ledger from a checkpoint kept in the bucket
  (`meta.checkpoint`), folds each task incrementally and puts its summary under
  `task.<task_id>` whenever it changes (batched: a burst of events costs one put per
  task). Restarted, it folds again only the tasks still open (from their own ledger
  subjects) and goes on from the checkpoint. Running it twice (two gateways) writes the
  same values.
* `TaskIndex`: a live in-memory mirror of the bucket (a KV watch), for answers in
  milliseconds at any size and for change notifications (the page's live updates).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from pydantic import BaseModel, Field, ValidationError

from jetmesh.bus import events as ev
from jetmesh.bus import ledger as _ledger
from jetmesh.bus import subjects
from jetmesh.bus.kvscan import current_entries
from jetmesh.bus.ledger import Ledger, LedgerEntry, decode_entry
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.orchestrator.state import TaskState, TaskStatus, approval_key, fold

__all__ = ["PendingApproval", "TaskIndex", "TaskProjector", "TaskSummary",
           "current_summaries", "projection_lag", "read_summaries", "summarize"]

log = logging.getLogger("jetmesh.tasks_kv")

CHECKPOINT_KEY = "meta.checkpoint"
TASKS_TTL_S = 30 * 86400.0
"""How long a task's summary is kept (the ledger keeps the task itself)."""


LOG_BASE: int | None = getattr(_ledger, "LOG_SEQ_BASE", None)
"""Where the steps' logs live in their own stream (JM_LOG), the ledger reads them back
with sequences from here up; None: they are on the ledger stream itself."""


A2A_CONTEXT_KEY = ev.CONTEXT_METADATA_KEY
"""The submission metadata key where the A2A gateway keeps a task's contextId
(`jetmesh.a2a.tasks.META_CONTEXT` is this)."""


def is_log(seq: int) -> bool:
    return LOG_BASE is not None and seq >= LOG_BASE


def follow_logs(after_log: int) -> dict[str, Any]:
    """`Ledger.follow` arguments that bring the steps' logs too (none are needed when
    they are on the ledger stream)."""
    return {"logs": True, "after_log": after_log} if LOG_BASE is not None else {}


def task_key(task_id: str) -> str:
    return f"task.{subjects.check_id(task_id, 'task id')}"


class PendingApproval(BaseModel):
    """One gated call waiting for a human (what the approvals inbox shows)."""

    task_id: str
    key: str
    """`step/tool/args_hash` (orchestrator.state.approval_key)."""
    step_id: str
    agent: str
    tool: str
    arguments: dict[str, Any]
    args_hash: str
    reason: str
    risk: str
    rule: str = ""
    """The policy rule that asked for the approval."""
    requested_at: datetime | None = None
    expires_at: datetime


class TaskSummary(BaseModel):
    """One task, as listings show it."""

    task_id: str
    status: TaskStatus
    workflow: str | None = None
    planner: str | None = None
    user_id: str | None = None
    goal: str = ""
    created_at: datetime | None = None
    updated_at: datetime | None = None
    duration_s: float | None = None
    """Submission to the task's end (or to its last event while it runs)."""
    cost_usd: float = 0.0
    budget_usd: float | None = None
    tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    steps_total: int = 0
    steps_done: int = 0
    code: str | None = None
    reason: str | None = None
    replay_of: str | None = None
    forked_from: str | None = None
    pending: list[PendingApproval] = Field(default_factory=list)
    last_seq: int = 0
    tenant: str | None = None
    context_id: str | None = None
    """The A2A context the task belongs to (its submission's metadata), for ListTasks."""


def summarize(state: TaskState, rules: dict[str, str] | None = None) -> TaskSummary:
    """The listing row of a folded task (pure)."""
    sub = state.submitted
    start, end = state.created_at, state.updated_at
    duration = (end - start).total_seconds() if start and end else None
    pending = [
        PendingApproval(task_id=state.task_id, key=key, step_id=p.step_id, agent=p.agent,
                        tool=p.tool, arguments=p.arguments, args_hash=p.args_hash,
                        reason=p.reason, risk=p.risk, rule=(rules or {}).get(key, ""),
                        requested_at=None, expires_at=p.expires_at)
        for key, p in state.pending_approvals.items()]
    return TaskSummary(
        task_id=state.task_id, status=state.status,
        workflow=sub.workflow if sub else None, planner=state.planner,
        user_id=sub.user_id if sub else None, goal=sub.goal if sub else "",
        created_at=start, updated_at=end, duration_s=duration,
        cost_usd=round(state.cost_usd, 8),
        budget_usd=sub.budget.max_usd if sub and sub.budget else None,
        tokens=state.input_tokens + state.output_tokens, model_calls=state.model_calls,
        tool_calls=state.tool_calls, steps_total=len(state.plan),
        steps_done=sum(1 for s in state.steps.values() if s.status.terminal),
        code=state.code, reason=state.reason,
        replay_of=sub.replay_of if sub else None,
        forked_from=sub.replay_of if sub and sub.fork else None,
        pending=pending, last_seq=state.last_seq,
        tenant=sub.tenant if sub else None,
        context_id=sub.metadata.get(A2A_CONTEXT_KEY) if sub else None)


class _Open:
    """What the projector holds for a task it is folding."""

    def __init__(self, state: TaskState) -> None:
        self.state = state
        self.rules: dict[str, str] = {}
        self.asked: dict[str, datetime] = {}
        self.last_log = 0

    def apply(self, entry: LedgerEntry) -> bool:
        """Fold one entry (False if already folded)."""
        if is_log(entry.seq):
            if entry.seq <= self.last_log:
                return False
            self.last_log = entry.seq
        elif entry.seq <= self.state.last_seq:
            return False
        e = entry.event
        if isinstance(e, ev.PolicyDecided) and e.data.decision == "approve":
            self.rules[approval_key(e.data.step_id, e.data.tool, e.data.args_hash)] = \
                e.data.rule
        elif isinstance(e, ev.ApprovalRequested):
            self.asked.setdefault(
                approval_key(e.data.step_id, e.data.tool, e.data.args_hash), e.time)
        fold(self.state.task_id, [entry], self.state)
        return True

    def summary(self) -> TaskSummary:
        s = summarize(self.state, self.rules)
        for p in s.pending:
            p.requested_at = self.asked.get(p.key)
        return s


async def open_bucket(js: JetStreamContext, *, create: bool = True) -> KeyValue | None:
    if create:
        return await ensure_bucket(js, subjects.BUCKET_TASKS, max_age_s=TASKS_TTL_S)
    try:
        return await js.key_value(subjects.BUCKET_TASKS)
    except (BucketNotFoundError, NotFoundError):
        return None


async def _read_all(js: JetStreamContext) -> dict[str, TaskSummary]:
    out: dict[str, TaskSummary] = {}
    for entry in await current_entries(js, subjects.BUCKET_TASKS, "task.*"):
        try:
            s = TaskSummary.model_validate_json(entry.value)
        except ValidationError as e:  # not the projector's: left out, the rest listed
            log.warning("jm-tasks: %s is not a task summary, left out: %s", entry.key,
                        str(e).splitlines()[0])
            continue
        out[s.task_id] = s
    return out


async def read_summaries(js: JetStreamContext) -> list[TaskSummary]:
    """Every task summary in the projection, newest first (none if there is none)."""
    kv = await open_bucket(js, create=False)
    if kv is None:
        return []
    rows = list((await _read_all(js)).values())
    rows.sort(key=lambda s: s.last_seq, reverse=True)
    return rows


async def _checkpoints(kv: KeyValue) -> tuple[int, int] | None:
    """(ledger, log) sequences whose effects are in the bucket (None: never written)."""
    try:
        got = await kv.get(CHECKPOINT_KEY)
    except (KeyNotFoundError, NotFoundError):
        return None
    value = json.loads(got.value or b"0")
    if isinstance(value, int):
        return value, 0
    return int(value["ledger"]), int(value.get("log", 0))


async def _checkpoint(kv: KeyValue) -> int | None:
    got = await _checkpoints(kv)
    return got[0] if got is not None else None


async def projection_lag(js: JetStreamContext) -> int | None:
    """How many ledger sequences the projection is behind (None: there is none)."""
    kv = await open_bucket(js, create=False)
    cp = await _checkpoint(kv) if kv is not None else None
    if cp is None:
        return None
    info = await js.stream_info(subjects.STREAM_LEDGER)
    return max(0, int(info.state.last_seq) - cp)


async def current_summaries(js: JetStreamContext, ledger: Ledger, *, max_tail: int = 5000
                            ) -> tuple[list[TaskSummary], int] | None:
    """Every task summary, newest first, as of now: the projection, plus the tasks of
    the ledger's tail past its checkpoint folded here (at most `max_tail` events of it;
    the second value is how many further events were not). None: no projection."""
    kv = await open_bucket(js, create=False)
    cp = await _checkpoint(kv) if kv is not None else None
    if kv is None or cp is None:
        return None
    rows = await _read_all(js)
    tail = await ledger.read_raw(subjects.ALL_LEDGER, from_seq=cp + 1)
    behind = max(0, len(tail) - max_tail)
    for tid in {t for _, subj, _ in tail[:max_tail] if (t := subjects.task_id_of(subj))}:
        rows[tid] = summarize(fold(tid, await ledger.read(tid)))
    out = sorted(rows.values(), key=lambda s: s.last_seq, reverse=True)
    return out, behind


class TaskProjector:
    """Keeps `jm-tasks` up to date from the ledger (see the module docstring)."""

    def __init__(self, js: JetStreamContext, ledger: Ledger, *, batch: int = 2000) -> None:
        self.js = js
        self.ledger = ledger
        self.batch = batch
        self.checkpoint = 0
        """Highest ledger sequence whose effects are in the bucket."""
        self.checkpoint_log = 0
        """Highest log sequence (see LOG_BASE) whose effects are in the bucket."""
        self._open: dict[str, _Open] = {}
        self._queue: asyncio.Queue[list[LedgerEntry]] = asyncio.Queue(maxsize=1000)
        self._tasks: list[asyncio.Task[None]] = []
        self._caught_up = asyncio.Event()
        self._target = 0
        self._progress = asyncio.Condition()

    async def start(self) -> None:
        kv = await open_bucket(self.js)
        assert kv is not None
        self.kv = kv
        self.checkpoint, self.checkpoint_log = await _checkpoints(kv) or (0, 0)
        if self.checkpoint:  # fold again only the tasks that were still open
            for s in (await _read_all(self.js)).values():
                if not s.status.terminal:
                    await self._load(s.task_id)
        info = await self.js.stream_info(subjects.STREAM_LEDGER)
        self._target = int(info.state.last_seq)
        if self._target <= self.checkpoint:
            self._caught_up.set()
        self._tasks = [
            asyncio.create_task(self._read(), name="tasks-kv-read"),
            asyncio.create_task(self._write(), name="tasks-kv-write")]

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    async def wait_caught_up(self, timeout: float | None = None) -> None:
        """Until everything in the ledger when `start` ran is in the bucket."""
        await asyncio.wait_for(self._caught_up.wait(), timeout)

    async def wait_for_seq(self, seq: int, timeout: float | None = None) -> None:
        """Until the bucket holds the effects of ledger (or log) sequence `seq`."""
        async def wait() -> None:
            async with self._progress:
                await self._progress.wait_for(
                    lambda: (self.checkpoint_log if is_log(seq) else self.checkpoint) >= seq)
        await asyncio.wait_for(wait(), timeout)

    async def _load(self, task_id: str) -> _Open:
        entries = await self.ledger.read(task_id)
        o = _Open(TaskState(task_id=task_id))
        for e in entries:
            o.apply(e)
        self._open[task_id] = o
        return o

    async def _catch_up(self, nxt: int) -> int:
        """Read what is stored from `nxt` in batched direct gets (much faster than a
        push consumer for a backlog); returns the next sequence to follow from."""
        while True:
            raw = await self.ledger._direct_batch(subjects.ALL_LEDGER, nxt, 1000)
            page: list[LedgerEntry] = []
            for seq, subject, data in raw:
                got = decode_entry(seq, subject, data)
                if isinstance(got, LedgerEntry):
                    page.append(got)
                else:
                    self.ledger.report_bad(got)
                nxt = seq + 1
            if page:  # a page at once: a task's events in it cost one put
                await self._queue.put(page)
            if len(raw) < 1000:
                return nxt

    async def _read(self) -> None:
        nxt, after_log = self.checkpoint + 1, self.checkpoint_log
        while True:
            try:
                if LOG_BASE is None:  # one stream: a backlog is read faster in batches
                    nxt = await self._catch_up(nxt)
                async for entry in self.ledger.follow(from_seq=nxt,
                                                      filter_subject=subjects.ALL_LEDGER,
                                                      **follow_logs(after_log)):
                    if is_log(entry.seq):
                        after_log = entry.seq
                    else:
                        nxt = entry.seq + 1
                    await self._queue.put([entry])
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.ledger.nc.is_closed:
                    return  # the connection's owner closed it: the projection stops
                log.warning("task projection: following the ledger failed (%s); again", e)
                await asyncio.sleep(1.0)

    async def _write(self) -> None:
        while True:
            got = list(await self._queue.get())
            while len(got) < self.batch and not self._queue.empty():
                got.extend(self._queue.get_nowait())
            try:
                await self._apply(got)
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed put: the next batch retries from the ledger
                log.exception("task projection: batch at seq %d not written", got[0].seq)
                for entry in got:
                    self._open.pop(entry.event.subject, None)
                await asyncio.sleep(1.0)
                continue

    async def _apply(self, entries: Iterable[LedgerEntry]) -> None:
        dirty: dict[str, _Open] = {}
        top, top_log = self.checkpoint, self.checkpoint_log
        for entry in entries:
            if is_log(entry.seq):
                top_log = max(top_log, entry.seq)
            else:
                top = max(top, entry.seq)
            tid = entry.event.subject
            o = self._open.get(tid)
            if o is None:
                if isinstance(entry.event, ev.TaskSubmitted):
                    o = self._open[tid] = _Open(TaskState(task_id=tid))
                else:  # ended earlier or before the checkpoint: fold it whole
                    dirty[tid] = await self._load(tid)
                    continue
            if o.apply(entry):
                dirty[tid] = o
        rows = [(tid, o.summary()) for tid, o in dirty.items()]
        for i in range(0, len(rows), 256):
            await asyncio.gather(*(
                self.kv.put(task_key(tid), s.model_dump_json().encode())
                for tid, s in rows[i:i + 256]))
        for tid, s in rows:
            if s.status.terminal:
                self._open.pop(tid, None)
        if (top, top_log) != (self.checkpoint, self.checkpoint_log):
            await self.kv.put(CHECKPOINT_KEY, json.dumps({"ledger": top, "log": top_log}
                                                         ).encode())
        async with self._progress:
            self.checkpoint, self.checkpoint_log = top, top_log
            self._progress.notify_all()
        if top >= self._target:
            self._caught_up.set()


class TaskIndex:
    """A live mirror of `jm-tasks` in memory: lists, counts and change notices."""

    def __init__(self, js: JetStreamContext, *, keep_changes: int = 4096) -> None:
        self.js = js
        self.tasks: dict[str, TaskSummary] = {}
        self.version = 0
        self._changes: deque[tuple[int, str]] = deque(maxlen=keep_changes)
        self._changed = asyncio.Condition()
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        kv = await open_bucket(self.js)
        assert kv is not None
        self._watcher = await kv.watch("task.*")
        self._task = asyncio.create_task(self._run(), name="tasks-kv-index")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self._watcher.stop()  # type: ignore[no-untyped-call]

    async def wait_loaded(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def _run(self) -> None:
        try:
            await self._watch()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the connection closed under it
            log.debug("jm-tasks index stopped: %s", e)

    async def _watch(self) -> None:
        async for entry in self._watcher:
            if entry is None:
                self._loaded.set()
                continue
            tid = entry.key.split(".", 1)[1]
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                self.tasks.pop(tid, None)
            else:
                try:
                    self.tasks[tid] = TaskSummary.model_validate_json(entry.value)
                except ValueError as e:
                    log.warning("jm-tasks %s is not a summary, skipped: %s", entry.key, e)
                    continue
            async with self._changed:
                self.version += 1
                self._changes.append((self.version, tid))
                self._changed.notify_all()

    async def changes_after(self, version: int, timeout: float) -> tuple[int, set[str] | None]:
        """(new version, task ids changed since `version`) once something changed, or
        (version, empty set) after `timeout`. None for the ids: too many changed to say
        which (read the list again)."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.version > version), timeout)
            if self.version == version:
                return version, set()
            if not self._changes or self._changes[0][0] > version + 1:
                return self.version, None
            return self.version, {tid for v, tid in self._changes if v > version}

    def query(self, *, status: str | None = None, workflow: str | None = None,
              user: str | None = None, q: str | None = None, limit: int = 50,
              offset: int = 0, tenant: str | None = None
              ) -> tuple[list[TaskSummary], int, dict[str, int]]:
        """(page newest first, rows matching, counts by status over every task); with
        `tenant`, only that tenant's tasks, counts included."""
        counts: dict[str, int] = {}
        rows: list[TaskSummary] = []
        needle = (q or "").strip().lower()
        for s in self.tasks.values():
            if tenant is not None and s.tenant != tenant:
                continue
            counts[s.status.value] = counts.get(s.status.value, 0) + 1
            if status and s.status.value != status:
                continue
            if workflow and (s.workflow or "") != workflow:
                continue
            if user and (s.user_id or "") != user:
                continue
            if needle and needle not in s.task_id.lower():
                continue
            rows.append(s)
        rows.sort(key=lambda s: (s.created_at or datetime.min.replace(tzinfo=UTC),
                                 s.last_seq), reverse=True)
        return rows[offset:offset + limit], len(rows), counts

    def pending(self) -> list[PendingApproval]:
        """Every pending approval across tasks, the soonest to expire first."""
        out = [p for s in self.tasks.values() if not s.status.terminal for p in s.pending]
        out.sort(key=lambda p: p.expires_at)
        return out
