"""The task ledger on JetStream: append (deduplicated, optionally fenced), read, follow.

A task's state is never held in a process: it is the fold of the task's events read
from here. Every event's id travels in `Nats-Msg-Id`, so a retried append is stored
once; `expected_last_subject_seq` makes an append conditional on nobody else having
written to that subject since, which fences out stale writers.

A message in the ledger that is not an event (garbage bytes, JSON that is not an
event, JSON too deep for `bus.wire`) never stops a reader: `read`, `read_step` and
`follow` pass over it and report it as a `Skipped(seq, subject, reason)`, in
`Entries.skipped` (what `read` returns: a list of the entries that decode, plus that
attribute) or to `follow`'s `on_bad` callback, and log a warning once per sequence. The
message itself stays in the ledger for inspection (`jetmesh show` lists it).
"""

from __future__ import annotations

import asyncio
import heapq
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError
from pydantic import ValidationError

from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.errors import (
    AppendConflict,
    InvalidEventError,
    LedgerReadError,
    LedgerWriteError,
)
from jetmesh.bus.events import (
    EVENT_ADAPTER,
    ApprovalDenied,
    ApprovalGranted,
    ApprovalRequested,
    BudgetAlerted,
    BudgetExceeded,
    CancelRequested,
    ContextCompacted,
    EffectStarted,
    Event,
    McpToolsChanged,
    ModelCalled,
    ModelRouted,
    PolicyDecided,
    StepCompleted,
    StepFailed,
    StepStarted,
    ToolCalled,
    decode_event,
    encode_event,
)
from jetmesh.bus.wire import safe_text

log = logging.getLogger("jetmesh.bus")

WRONG_LAST_SEQUENCE = 10071
"""JetStream API error code: Nats-Expected-Last-Subject-Sequence did not match."""
EXPECTED_LAST_SEQ = hn.EXPECTED_LAST_SUBJECT_SEQUENCE
"""The fence header: stored only if the subject's last sequence is this one. It is
stored with the message, so a delivered event tells what came before it on its subject."""
EXPECTED_LAST_SEQ_SUBJECT = hn.EXPECTED_LAST_SUBJECT_SEQUENCE_SUBJECT
"""With EXPECTED_LAST_SEQ: the subject whose last sequence is checked, if not the
message's own."""
LOG_SEQ_BASE = 1 << 40
"""A record of the steps' logs (stream JM_LOG) is read back with sequence LOG_SEQ_BASE +
its JM_LOG sequence: one number space for both streams, in which a log record's
sequence never equals a ledger sequence (ids, sets of seen sequences) and is never
taken for one (fences, cursors and the fold's last sequence are ledger sequences).
Under 2**53, so a JSON number in every language."""


def is_log_seq(seq: int) -> bool:
    """Whether `seq` is a log record's (see LOG_SEQ_BASE)."""
    return seq >= LOG_SEQ_BASE


def _not_a_log(subject: str) -> bool:
    return not subjects.is_step_log(subject)


def _and_not_a_log(keep: Callable[[str], bool]) -> Callable[[str], bool]:
    return lambda subject: keep(subject) and not subjects.is_step_log(subject)


def _logs_only(filt: str) -> bool:
    """Whether a subject filter matches steps' logs only (`jm.task.<t|*>.step.<s|*>.log`)."""
    parts = filt.split(".")
    return len(parts) == 6 and parts[3] == "step" and parts[5] == "log"


def _ts_key(stamp: str) -> tuple[str, str]:
    """An RFC 3339 UTC time stamp (nats-server's Nats-Time-Stamp, trailing zeros of the
    fraction trimmed) as a key that sorts in time order."""
    head, _, frac = stamp.rstrip("Z").partition(".")
    return head[:19], frac.ljust(9, "0")


@dataclass(frozen=True)
class Appended:
    """The ack of one append."""

    seq: int
    duplicate: bool
    subject: str = ""
    """Where the event was stored (set by append_pipelined)."""


@dataclass(frozen=True)
class LedgerEntry:
    """One stored event with its stream sequence number and subject."""

    seq: int
    subject: str
    event: Event


@dataclass(frozen=True)
class Skipped:
    """A stored message a reader passed over because it does not decode (it stays in
    its stream). `reason` is safe to log and to store (bounded, encodable)."""

    seq: int
    subject: str
    reason: str


class Entries(list[LedgerEntry]):
    """What `Ledger.read` returns: the entries that decode, in ledger order (a plain
    list to every caller), and `skipped`: the messages in the range read that did not,
    in order. A fence computed from the entries alone (the last sequence on a subject)
    must also count the skipped ones on that subject: see `last_seq`."""

    skipped: list[Skipped]

    def __init__(self, entries: Iterable[LedgerEntry] = (),
                 skipped: Iterable[Skipped] = ()) -> None:
        super().__init__(entries)
        self.skipped = list(skipped)

    def last_seq(self, keep: Callable[[str], bool] | None = None) -> int:
        """The highest sequence read, decoded or skipped, among subjects `keep` accepts
        (all without it); 0 if none."""
        return max((x.seq for x in (*self, *self.skipped) if keep is None or keep(x.subject)),
                   default=0)


def through(entries: Sequence[LedgerEntry], seq: int) -> list[LedgerEntry]:
    """The entries read up to and including ledger sequence `seq` (with the log records
    merged in before it: their own sequences are JM_LOG's, see LOG_SEQ_BASE); none if
    `seq` is not among them."""
    for i, e in enumerate(entries):
        if e.seq == seq:
            return list(entries[:i + 1])
    return []


def decode_entry(seq: int, subject: str, data: bytes) -> LedgerEntry | Skipped:
    """One stored message as an entry, or as a Skipped with the reason. Never raises:
    bytes are checked by `bus.wire` before pydantic sees them."""
    try:
        return LedgerEntry(seq, subject, decode_event(data))
    except ValidationError as e:
        errs = e.errors()
        where = ".".join(str(x) for x in errs[0]["loc"]) if errs else ""
        first = (f"{where}: " if where else "") + (errs[0]["msg"] if errs else "")
        reason = f"not an event ({e.error_count()} error(s)): {first}"
    except Exception as e:  # decode_event raises only ValidationError; total anyway
        reason = f"not an event: {type(e).__name__}: {safe_text(e, 400)}"
    return Skipped(seq, safe_text(subject, 512), safe_text(reason, 500))


def subject_for(event: Event) -> str:
    """Where an event is stored: its step's fenced line or log, the control subject, or
    the task's.

    A step's line holds what must be fenced: its claims, side-effecting tool calls,
    policy and approval events, budget stops and results. Its model calls, read-only
    tool calls and a first delivery's start (not a claim) go to its log (pipelined,
    unfenced, audit and replay)."""
    task = event.subject
    if isinstance(event, ModelCalled) and event.data.step_id:
        return subjects.step_log(task, event.data.step_id)
    if isinstance(event, ToolCalled) and not event.data.side_effects:
        return subjects.step_log(task, event.data.step_id)
    if isinstance(event, StepStarted) and not event.data.claim:
        return subjects.step_log(task, event.data.step_id)
    if isinstance(event, StepStarted | ToolCalled | StepCompleted | StepFailed
                  | PolicyDecided | ApprovalRequested | EffectStarted):
        return subjects.step_events(task, event.data.step_id)
    if isinstance(event, McpToolsChanged) and event.data.step_id:
        return subjects.step_log(task, event.data.step_id)
    if isinstance(event, ModelRouted | ContextCompacted):  # decisions of the step's loop
        return subjects.step_log(task, event.data.step_id)
    if isinstance(event, BudgetExceeded | BudgetAlerted) and event.data.step_id:
        return subjects.step_events(task, event.data.step_id)
    if isinstance(event, ApprovalGranted | ApprovalDenied):
        return subjects.task_approval(task)
    if isinstance(event, CancelRequested):
        return subjects.task_control(task)
    return subjects.task_events(task)


def validate_event(event: Event | dict[str, Any] | bytes) -> Event:
    """Validate before anything is written; InvalidEventError carries pydantic's reasons."""
    try:
        if isinstance(event, bytes):
            return decode_event(event)
        if isinstance(event, dict):
            return EVENT_ADAPTER.validate_python(event)
        # Round-trip so a model built with model_construct or mutated is re-checked.
        return EVENT_ADAPTER.validate_python(event.model_dump())
    except ValidationError as e:
        raise InvalidEventError(
            f"invalid event: {e.error_count()} validation error(s)",
            [{"loc": [safe_text(x, 200) if isinstance(x, str) else x for x in err["loc"]],
              "msg": safe_text(err["msg"], 500), "type": err["type"]}
             for err in e.errors()],
        ) from e
    except (ValueError, RecursionError) as e:  # a value pydantic cannot even walk
        raise InvalidEventError(f"invalid event: {type(e).__name__}") from None


def event_headers(event: Event, expected: int | None,
                  on_subject: str | None = None) -> dict[str, str]:
    """An append's headers: the event id (dedup), its type, trace context, the fence
    (the last sequence of the event's own subject, or of `on_subject`)."""
    h = {hn.MSG_ID: event.id, hn.CE_TYPE: event.type}
    if event.traceparent:
        h[hn.TRACEPARENT] = event.traceparent
    if expected is not None:
        h[EXPECTED_LAST_SEQ] = str(expected)
        if on_subject is not None:
            h[EXPECTED_LAST_SEQ_SUBJECT] = on_subject
    return h


class _Stamped(Entries):
    """What one read of one stream gave, with each entry's and each skipped message's
    nats-server time stamp (`entry_stamps`, `skipped_stamps`)."""

    def __init__(self) -> None:
        super().__init__()
        self.entry_stamps: list[str] = []
        self.skipped_stamps: list[str] = []


def _by_seq(parts: Sequence[_Stamped]) -> _Stamped:
    """Reads of one stream (several filters) as one, in sequence order."""
    if len(parts) == 1:
        return parts[0]
    out = _Stamped()
    for e, t in sorted(((e, t) for p in parts for e, t in zip(p, p.entry_stamps, strict=True)),
                       key=lambda et: et[0].seq):
        out.append(e)
        out.entry_stamps.append(t)
    for b, t in sorted(((b, t) for p in parts
                        for b, t in zip(p.skipped, p.skipped_stamps, strict=True)),
                       key=lambda bt: bt[0].seq):
        out.skipped.append(b)
        out.skipped_stamps.append(t)
    return out


def _merge(ledger: Sequence[_Stamped], log: Sequence[_Stamped] = ()) -> Entries:
    """The ledger's and the logs' reads as one: each stream in its own order, the two
    interleaved in the order nats-server received their messages (a stable merge on
    the time stamps, ledger first at a tie)."""
    led = _by_seq(ledger)
    logs = _by_seq(log) if log else None
    if logs is None or not (len(logs) or logs.skipped):
        return Entries(led, led.skipped)
    if not (len(led) or led.skipped):
        return Entries(logs, logs.skipped)

    def merged(a: Sequence[Any], ta: list[str], b: Sequence[Any], tb: list[str]) -> list[Any]:
        return [x for _, _, x in heapq.merge(
            ((_ts_key(t), 0, x) for x, t in zip(a, ta, strict=True)),
            ((_ts_key(t), 1, x) for x, t in zip(b, tb, strict=True)),
            key=lambda k: (k[0], k[1]))]

    return Entries(merged(led, led.entry_stamps, logs, logs.entry_stamps),
                   merged(led.skipped, led.skipped_stamps, logs.skipped, logs.skipped_stamps))


class Ledger:
    """Append to and read from the LEDGER stream (and JM_LOG, the steps' logs). One per
    connection; safe to share."""

    def __init__(self, nc: NATS, js: JetStreamContext, *, timeout_s: float = 5.0) -> None:
        self.nc = nc
        self.js = js
        self.timeout_s = timeout_s
        # task id -> highest LEDGER sequence of that task this process wrote or was told
        # of. On a replicated stream any replica answers a direct get, and a follower a
        # few entries behind (or a node catching up after a restart) would serve a read
        # that misses them; `read` retries until the answer includes this sequence.
        self._known: OrderedDict[str, int] = OrderedDict()
        self._reply_sub: Any = None
        self._reply_prefix = ""
        self._token = 0
        self._pending: dict[str, tuple[list[tuple[int, str, bytes]],
                                       asyncio.Future[list[tuple[int, str, bytes]]],
                                       list[str] | None]] = {}
        self._acks: dict[str, tuple[str, int, asyncio.Future[Appended]]] = {}
        """Fenced pipelined appends waiting for their ack: token -> (the fence's subject,
        its expected sequence, future)."""
        self._has_legacy_logs: bool | None = None
        self._reported: OrderedDict[tuple[str, int], None] = OrderedDict()
        """(stream, seq) of the bad messages already logged (bounded): a warning once."""

    def report_bad(self, bad: Skipped, stream: str = subjects.STREAM_LEDGER) -> None:
        """Log a message a reader passed over, once per (stream, sequence)."""
        key = (stream, bad.seq)
        if key in self._reported:
            return
        self._reported[key] = None
        while len(self._reported) > 10_000:
            self._reported.popitem(last=False)
        log.warning("%s seq=%d on %s is not readable, skipped (kept in the stream): %s",
                    stream, bad.seq, bad.subject, bad.reason)

    def observe(self, task_id: str, seq: int) -> None:
        """Make later reads of `task_id` include everything up to ledger sequence `seq`.

        Appends call it; a consumer of ledger messages calls it with the delivered
        message's stream sequence (`msg.metadata.sequence.stream`) before reading.
        """
        if seq > self._known.get(task_id, 0):
            self._known[task_id] = seq
        self._known.move_to_end(task_id)
        while len(self._known) > 100_000:
            self._known.popitem(last=False)

    # ------------------------------------------------------------------ append

    async def append(
        self,
        event: Event,
        *,
        expected_last_subject_seq: int | None = None,
        validate: bool = True,
        data: bytes | None = None,
    ) -> int:
        """Store `event`; return its stream sequence (the original one for a duplicate).
        `data`: the event's bytes, if the caller has encoded it already (`encode_event`).

        Raises InvalidEventError (nothing written) or AppendConflict (fenced out).
        """
        if validate:
            event = validate_event(event)
            data = None
        subject = subject_for(event)
        try:
            ack = await self.js.publish(
                subject, encode_event(event) if data is None else data, timeout=self.timeout_s,
                headers=event_headers(event, expected_last_subject_seq),
            )
        except APIError as e:
            if e.err_code == WRONG_LAST_SEQUENCE:
                raise AppendConflict(
                    subject, expected_last_subject_seq or 0, str(e.description)
                ) from e
            raise
        if ack.stream == subjects.STREAM_LOG:
            return LOG_SEQ_BASE + int(ack.seq)
        self.observe(event.subject, int(ack.seq))
        return int(ack.seq)

    async def append_many(self, events: Sequence[Event], *, validate: bool = True) -> list[int]:
        """Pipelined appends (no fencing): send all, then wait for every ack."""
        return [a.seq for a in await self.append_pipelined(events, validate=validate)]

    async def append_pipelined(
        self, events: Sequence[Event], *, validate: bool = True,
        also: Sequence[tuple[str, bytes, dict[str, str]]] = (),
        expect: Sequence[tuple[str, int] | None] = (),
    ) -> list[Appended]:
        """Send every event (and `also`: extra JetStream publishes, e.g. work commands)
        without waiting, then wait for all acks. Returns each event's sequence and whether
        JetStream dropped it as a duplicate of an earlier append with the same id.

        `expect[i]` = (subject, seq): event i is stored only if `subject`'s last sequence
        is `seq` (a condition on another subject, e.g. the task's control messages). If
        one is refused, the others are still stored and AppendConflict is raised after
        every ack is in."""
        checked = [validate_event(e) if validate else e for e in events]
        conditions = list(expect) + [None] * (len(checked) - len(expect))
        subjects_of = [subject_for(e) for e in checked]
        futures: list[asyncio.Future[Any]] = []
        for e, subj, cond in zip(checked, subjects_of, conditions, strict=True):
            if cond is None:
                futures.append(await self.js.publish_async(
                    subj, encode_event(e), headers=event_headers(e, None)))
            else:
                futures.append(await self._publish_fenced(e, subj, cond))
        futures += [await self.js.publish_async(subj, data, headers=dict(h))
                    for subj, data, h in also]
        try:
            acks = await asyncio.wait_for(
                asyncio.gather(*futures, return_exceptions=True), self.timeout_s)
        finally:
            for f in futures:
                if not f.done():
                    f.cancel()
        out = []
        for e, subj, a in zip(checked, subjects_of, acks, strict=False):
            if isinstance(a, BaseException):
                continue
            if getattr(a, "stream", None) == subjects.STREAM_LOG:
                out.append(Appended(LOG_SEQ_BASE + int(a.seq), bool(a.duplicate), subj))
                continue
            self.observe(e.subject, int(a.seq))
            out.append(Appended(int(a.seq), bool(a.duplicate), subj))
        for a in acks:
            if isinstance(a, BaseException):
                raise a
        return out

    async def _publish_fenced(self, event: Event, subject: str, cond: tuple[str, int]
                              ) -> asyncio.Future[Appended]:
        """Send `event`, stored only if the last sequence of `cond`'s subject is its
        sequence. The ack comes to this ledger's own wildcard inbox, routed by token, so
        a refusal resolves the future (nats-py's publish_async leaves the future of a
        publish answered with an API error unresolved)."""
        if self._reply_sub is None:
            await self._reply_inbox()
        self._token += 1
        token = f"a{self._token}"
        fut: asyncio.Future[Appended] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda _: self._acks.pop(token, None))
        self._acks[token] = (cond[0], cond[1], fut)
        await self.nc.publish(subject, encode_event(event),
                              reply=f"{self._reply_prefix}.{token}",
                              headers=event_headers(event, cond[1], cond[0]))
        return fut

    # ------------------------------------------------------------------ read

    async def read(
        self, task_id: str, *, from_seq: int = 1, subject: str | None = None,
        limit: int = 100_000, keep: Callable[[str], bool] | None = None,
        without_logs: bool = False, after_log: int = 0,
    ) -> Entries:
        """The task's events (or one subject's) with seq >= from_seq, in order; with
        `keep`, only those whose subject it accepts (the others are not decoded); with
        `without_logs`, none of its steps' logs (model and read-only tool calls), which
        the server then never sends.

        The steps' logs live in their own stream (JM_LOG, see `LOG_SEQ_BASE`): they are
        read with the ledger and merged into it in the order nats-server received them
        (its time stamps; each stream's own order is kept). `from_seq` is a ledger
        sequence; log records are those with a sequence above `after_log` (all by
        default: an incremental reader that wants the logs passes the highest log
        sequence it has).

        A message that does not decode is not returned and does not stop the read: it
        is in the result's `skipped` (and logged once). `limit` counts both.

        Uses JetStream batched direct get: one request per subject filter, the server
        streams the matching messages back and ends with an end-of-batch status.
        """
        if subject is not None and subjects.is_step_log(subject):
            filters = [subject] if await self._legacy_logs() else []
            logs: str | None = subject
        elif subject is not None:
            filters, logs = [subject], None
        elif without_logs:
            # The steps' logs are in JM_LOG: the task's wildcard on the ledger has only
            # its decisions (and the logs of a ledger written before the split, which
            # `keep` leaves undecoded). One request, where two filters took two.
            filters, logs = [subjects.task_all(task_id)], None
            keep = _not_a_log if keep is None else _and_not_a_log(keep)
        else:
            filters, logs = [subjects.task_all(task_id)], subjects.task_logs(task_id)
        want = self._known.get(task_id, 0) if subject is None else 0
        deadline = time.monotonic() + self.timeout_s
        pause = 0.005
        while True:
            reads = [self._read_once(f, from_seq, limit, keep) for f in filters]
            if logs is not None:
                reads.append(self._read_once(logs, after_log - LOG_SEQ_BASE + 1
                                             if after_log else 1, limit, keep,
                                             stream=subjects.STREAM_LOG))
            if len(reads) == 1:
                one, top = await reads[0]
                out = Entries(one, one.skipped)
            else:
                parts = await asyncio.gather(*reads)
                out = _merge([p for p, _ in parts[:len(filters)]],
                             [p for p, _ in parts[len(filters):]])
                top = max((t for _, t in parts[:len(filters)]), default=0)
            if want < from_seq or top >= want or len(out) + len(out.skipped) >= limit:
                return out
            # A replica behind what this process knows is in the ledger answered: ask
            # again (another replica, or the same one caught up).
            if time.monotonic() > deadline:
                raise LedgerReadError(
                    f"read of {task_id}: no replica has reached ledger sequence {want}")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def read_step(self, task_id: str, step_id: str, *, from_seq: int = 1
                        ) -> Entries:
        """One step's events, its fenced line and its log merged in ledger order (what
        does not decode is in `skipped`, as for `read`)."""
        line = subjects.step_events(task_id, step_id)
        log = subjects.step_log(task_id, step_id)
        reads = [self._read_once(line, from_seq, 100_000),
                 self._read_once(log, 1, 100_000, stream=subjects.STREAM_LOG)]
        if await self._legacy_logs():
            reads.append(self._read_once(log, from_seq, 100_000))
        (line_part, _), (log_part, _), *legacy = await asyncio.gather(*reads)
        return _merge([line_part, *(p for p, _ in legacy)], [log_part])

    async def _legacy_logs(self) -> bool:
        """Whether the ledger holds steps' logs written before they had a stream of their
        own (asked once per Ledger: no new ones are ever written there)."""
        if self._has_legacy_logs is None:
            found = await self._direct_batch(subjects.ALL_STEP_LOGS, 1, 1)
            self._has_legacy_logs = bool(found)
        return self._has_legacy_logs

    async def _read_once(self, filt: str, from_seq: int, limit: int,
                         keep: Callable[[str], bool] | None = None,
                         stream: str = subjects.STREAM_LEDGER,
                         ) -> tuple[_Stamped, int]:
        """The entries read (those `keep` accepts; the bad ones in `skipped`), with
        their time stamps, and the highest sequence seen (in `stream`'s own numbers).
        A log record's sequence is given as LOG_SEQ_BASE + its JM_LOG sequence."""
        out = _Stamped()
        base = LOG_SEQ_BASE if stream == subjects.STREAM_LOG else 0
        start = max(1, from_seq)
        top = 0
        while True:
            room = limit - len(out) - len(out.skipped)
            stamps: list[str] = []
            batch = await self._direct_batch(filt, start, min(room, 1000), stream,
                                             stamps=stamps)
            for (seq, subj, data), stamp in zip(batch, stamps, strict=True):
                top = seq
                if keep is None or keep(subj):
                    got = decode_entry(base + seq, subj, data)
                    if isinstance(got, LedgerEntry):
                        out.append(got)
                        out.entry_stamps.append(stamp)
                    else:
                        self.report_bad(got, stream)
                        out.skipped.append(got)
                        out.skipped_stamps.append(stamp)
            if len(batch) < 1000 or len(out) + len(out.skipped) >= limit:
                return out, top
            start = batch[-1][0] + 1

    async def read_raw(
        self, filter_subject: str, *, from_seq: int = 1, batch: int = 1000
    ) -> list[tuple[int, str, bytes]]:
        """Raw (seq, subject, bytes) of any LEDGER subject filter, for projections."""
        out: list[tuple[int, str, bytes]] = []
        start = max(1, from_seq)
        while True:
            got = await self._direct_batch(filter_subject, start, batch)
            out.extend(got)
            if len(got) < batch:
                return out
            start = got[-1][0] + 1

    async def _direct_batch_all(self, filter_subject: str, *, stream: str,
                                batch: int = 1000) -> list[tuple[int, str, bytes]]:
        out: list[tuple[int, str, bytes]] = []
        start = 1
        while True:
            got = await self._direct_batch(filter_subject, start, batch, stream)
            out.extend(got)
            if len(got) < batch:
                return out
            start = got[-1][0] + 1

    async def _direct_batch(
        self, filter_subject: str, start: int, batch: int, stream: str = subjects.STREAM_LEDGER,
        stamps: list[str] | None = None,
    ) -> list[tuple[int, str, bytes]]:
        """One batched direct get. Replies come to one long-lived wildcard inbox and are
        routed to the waiting request by token (no subscribe/unsubscribe per read).
        `stamps`: each message's Nats-Time-Stamp is appended to it."""
        if self._reply_sub is None:
            await self._reply_inbox()
        self._token += 1
        token = str(self._token)
        done: asyncio.Future[list[tuple[int, str, bytes]]] = \
            asyncio.get_running_loop().create_future()
        self._pending[token] = ([], done, stamps)
        try:
            req = {"seq": start, "next_by_subj": filter_subject, "batch": batch}
            await self.nc.publish(subjects.direct_get(stream), json.dumps(req).encode(),
                                  reply=f"{self._reply_prefix}.{token}")
            try:
                return await asyncio.wait_for(done, self.timeout_s)
            except TimeoutError as e:
                raise LedgerReadError(f"direct get on {filter_subject} timed out") from e
        finally:
            self._pending.pop(token, None)

    async def _reply_inbox(self) -> None:
        self._reply_prefix = self.nc.new_inbox()
        self._reply_sub = await self.nc.subscribe(f"{self._reply_prefix}.*",
                                                  cb=self._on_reply)

    def _on_ack(self, token: str, msg: Msg) -> None:
        subject, expected, fut = self._acks.pop(token)
        if fut.done():
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            status = (msg.headers or {}).get(hn.STATUS, "")
            fut.set_exception(LedgerWriteError(f"append to {subject}: no ack ({status})"))
            return
        err = resp.get("error")
        if err is None:
            fut.set_result(Appended(int(resp["seq"]), bool(resp.get("duplicate"))))
        elif err.get("err_code") == WRONG_LAST_SEQUENCE:
            fut.set_exception(AppendConflict(subject, expected, str(err.get("description"))))
        else:
            fut.set_exception(LedgerWriteError(
                f"append to {subject}: {err.get('code')} {err.get('description')}"))

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rsplit(".", 1)[-1]
        if token in self._acks:
            self._on_ack(token, msg)
            return
        pending = self._pending.get(token)
        if pending is None:
            return
        out, done, stamps = pending
        if done.done():
            return
        hdrs = msg.headers or {}
        status = hdrs.get(hn.STATUS)
        if status in ("204", "404"):  # end of batch / nothing found
            done.set_result(out)
        elif status:
            done.set_exception(LedgerReadError(
                f"direct get: {status} {hdrs.get(hn.DESCRIPTION, '')}"))
        else:
            try:
                out.append((int(hdrs[hn.SEQUENCE]), hdrs[hn.SUBJECT], msg.data))
                if stamps is not None:
                    stamps.append(hdrs.get(hn.TIME_STAMP, ""))
            except (KeyError, ValueError):  # not a direct-get reply: not ours to read
                log.warning("direct get reply without sequence or subject on %s, ignored",
                            safe_text(msg.subject, 200))

    # ------------------------------------------------------------------ follow

    async def follow(
        self, task_id: str | None = None, *, from_seq: int = 1, filter_subject: str | None = None,
        idle_heartbeat_s: float = 2.0, on_bad: Callable[[Skipped], None] | None = None,
        logs: bool = False, after_log: int = 0,
    ) -> AsyncIterator[LedgerEntry]:
        """Replay from `from_seq`, then tail forever (the caller breaks out).

        An ordered consumer: the client library recreates it from the next expected
        sequence after a gap or reconnect, so no event is skipped or repeated. To resume
        in a new process, pass the last seen sequence + 1 as `from_seq`.

        The steps' logs (JM_LOG: model calls, read-only tool calls) come too only with
        `logs` (those after log sequence `after_log`), as they arrive, with sequences
        from LOG_SEQ_BASE up: a follower that resumes from the last sequence it saw
        passes the last ledger one as `from_seq` and the last log one as `after_log`.
        A `filter_subject` over steps' logs alone (`jm.task.*.step.*.log`) follows JM_LOG
        (`from_seq` then a log sequence, LOG_SEQ_BASE up, or 1).

        A message that does not decode is passed over (logged once) and given to
        `on_bad` if set; following goes on.
        """
        filt = filter_subject or (subjects.task_all(task_id) if task_id else subjects.ALL_LEDGER)
        if _logs_only(filt):  # a filter over steps' logs alone: JM_LOG is where they are
            start = from_seq - LOG_SEQ_BASE if is_log_seq(from_seq) else from_seq
            subs = [(await self._ordered(subjects.STREAM_LOG, filt, start, idle_heartbeat_s),
                     LOG_SEQ_BASE)]
        else:
            subs = [(await self._ordered(subjects.STREAM_LEDGER, filt, from_seq,
                                         idle_heartbeat_s), 0)]
        if logs and not _logs_only(filt):
            log_filt = subjects.task_logs(task_id) if task_id else subjects.ALL_STEP_LOGS
            subs.append((await self._ordered(
                subjects.STREAM_LOG, log_filt,
                after_log - LOG_SEQ_BASE + 1 if after_log else 1, idle_heartbeat_s),
                LOG_SEQ_BASE))
        waiting: dict[asyncio.Future[Msg], int] = {}
        try:
            while True:
                for s_, base in subs:
                    if base not in waiting.values():
                        waiting[asyncio.ensure_future(s_.next_msg(timeout=None))] = base
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for fut in sorted(done, key=lambda f: waiting[f]):
                    base = waiting.pop(fut)
                    try:
                        msg = fut.result()
                    except TimeoutError:
                        continue
                    got = decode_entry(base + int(msg.metadata.sequence.stream), msg.subject,
                                       msg.data)
                    if isinstance(got, LedgerEntry):
                        yield got
                        continue
                    self.report_bad(got, subjects.STREAM_LOG if base else
                                    subjects.STREAM_LEDGER)
                    if on_bad is not None:
                        on_bad(got)
        finally:
            for fut in waiting:
                fut.cancel()
            for s_, _ in subs:
                try:
                    await s_.unsubscribe()
                except Exception:  # connection may already be closed
                    pass

    async def _ordered(self, stream: str, filt: str, from_seq: int, idle_heartbeat_s: float
                       ) -> Any:
        return await self.js.subscribe(
            filt, stream=stream, ordered_consumer=True, idle_heartbeat=idle_heartbeat_s,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, from_seq)))
