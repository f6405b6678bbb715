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
EXPECTED_LAST_SEQ = "Nats-Expected-Last-Subject-Sequence"
"""The fence header: stored only if the subject's last sequence is this one. It is
stored with the message, so a delivered event tells what came before it on its subject."""
EXPECTED_LAST_SEQ_SUBJECT = "Nats-Expected-Last-Subject-Sequence-Subject"
"""With EXPECTED_LAST_SEQ: the subject whose last sequence is checked, if not the
message's own."""


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
    h = {"Nats-Msg-Id": event.id, "Ce-Type": event.type}
    if event.traceparent:
        h["traceparent"] = event.traceparent
    if expected is not None:
        h[EXPECTED_LAST_SEQ] = str(expected)
        if on_subject is not None:
            h[EXPECTED_LAST_SEQ_SUBJECT] = on_subject
    return h


class Ledger:
    """Append to and read from the LEDGER stream. One per connection; safe to share."""

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
                                       asyncio.Future[list[tuple[int, str, bytes]]]]] = {}
        self._acks: dict[str, tuple[str, int, asyncio.Future[Appended]]] = {}
        """Fenced pipelined appends waiting for their ack: token -> (the fence's subject,
        its expected sequence, future)."""
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
    ) -> int:
        """Store `event`; return its stream sequence (the original one for a duplicate).

        Raises InvalidEventError (nothing written) or AppendConflict (fenced out).
        """
        if validate:
            event = validate_event(event)
        subject = subject_for(event)
        try:
            ack = await self.js.publish(
                subject, encode_event(event), timeout=self.timeout_s,
                headers=event_headers(event, expected_last_subject_seq),
            )
        except APIError as e:
            if e.err_code == WRONG_LAST_SEQUENCE:
                raise AppendConflict(
                    subject, expected_last_subject_seq or 0, str(e.description)
                ) from e
            raise
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
        without_logs: bool = False,
    ) -> Entries:
        """The task's events (or one subject's) with seq >= from_seq, in order; with
        `keep`, only those whose subject it accepts (the others are not decoded); with
        `without_logs`, none of its steps' logs (model and read-only tool calls), which
        the server then never sends.

        A message that does not decode is not returned and does not stop the read: it
        is in the result's `skipped` (and logged once). `limit` counts both.

        Uses JetStream batched direct get: one request per subject filter, the server
        streams the matching messages back and ends with an end-of-batch status.
        """
        if subject is None and without_logs:
            filters = subjects.task_decisions(task_id)
        else:
            filters = [subject or subjects.task_all(task_id)]
        want = self._known.get(task_id, 0) if subject is None else 0
        deadline = time.monotonic() + self.timeout_s
        pause = 0.005
        while True:
            if len(filters) == 1:
                out, top = await self._read_once(filters[0], from_seq, limit, keep)
            else:
                parts = await asyncio.gather(
                    *(self._read_once(f, from_seq, limit, keep) for f in filters))
                out = Entries(sorted((e for part, _ in parts for e in part),
                                     key=lambda e: e.seq),
                              sorted((b for part, _ in parts for b in part.skipped),
                                     key=lambda b: b.seq))
                top = max(t for _, t in parts)
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
        return await self.read(task_id, from_seq=from_seq,
                               keep=lambda subj: subj in (line, log))

    async def _read_once(self, filt: str, from_seq: int, limit: int,
                         keep: Callable[[str], bool] | None = None
                         ) -> tuple[Entries, int]:
        """The entries read (those `keep` accepts; the bad ones in `skipped`) and the
        highest sequence seen."""
        out = Entries()
        start = max(1, from_seq)
        top = 0
        while True:
            room = limit - len(out) - len(out.skipped)
            batch = await self._direct_batch(filt, start, min(room, 1000))
            for seq, subj, data in batch:
                top = seq
                if keep is None or keep(subj):
                    got = decode_entry(seq, subj, data)
                    if isinstance(got, LedgerEntry):
                        out.append(got)
                    else:
                        self.report_bad(got)
                        out.skipped.append(got)
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
        self, filter_subject: str, start: int, batch: int, stream: str = subjects.STREAM_LEDGER
    ) -> list[tuple[int, str, bytes]]:
        """One batched direct get. Replies come to one long-lived wildcard inbox and are
        routed to the waiting request by token (no subscribe/unsubscribe per read)."""
        if self._reply_sub is None:
            await self._reply_inbox()
        self._token += 1
        token = str(self._token)
        done: asyncio.Future[list[tuple[int, str, bytes]]] = \
            asyncio.get_running_loop().create_future()
        self._pending[token] = ([], done)
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
            status = (msg.headers or {}).get("Status", "")
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
        out, done = pending
        if done.done():
            return
        hdrs = msg.headers or {}
        status = hdrs.get("Status")
        if status in ("204", "404"):  # end of batch / nothing found
            done.set_result(out)
        elif status:
            done.set_exception(LedgerReadError(
                f"direct get: {status} {hdrs.get('Description', '')}"))
        else:
            try:
                out.append((int(hdrs["Nats-Sequence"]), hdrs["Nats-Subject"], msg.data))
            except (KeyError, ValueError):  # not a direct-get reply: not ours to read
                log.warning("direct get reply without sequence or subject on %s, ignored",
                            safe_text(msg.subject, 200))

    # ------------------------------------------------------------------ follow

    async def follow(
        self, task_id: str | None = None, *, from_seq: int = 1, filter_subject: str | None = None,
        idle_heartbeat_s: float = 2.0, on_bad: Callable[[Skipped], None] | None = None,
    ) -> AsyncIterator[LedgerEntry]:
        """Replay from `from_seq`, then tail forever (the caller breaks out).

        An ordered consumer: the client library recreates it from the next expected
        sequence after a gap or reconnect, so no event is skipped or repeated. To resume
        in a new process, pass the last seen sequence + 1 as `from_seq`.

        A message that does not decode is passed over (logged once) and given to
        `on_bad` if set; following goes on.
        """
        filt = filter_subject or (subjects.task_all(task_id) if task_id else subjects.ALL_LEDGER)
        sub = await self.js.subscribe(
            filt,
            stream=subjects.STREAM_LEDGER,
            ordered_consumer=True,
            idle_heartbeat=idle_heartbeat_s,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, from_seq)
            ),
        )
        try:
            while True:
                try:
                    msg = await sub.next_msg(timeout=None)
                except TimeoutError:
                    continue
                got = decode_entry(int(msg.metadata.sequence.stream), msg.subject, msg.data)
                if isinstance(got, LedgerEntry):
                    yield got
                    continue
                self.report_bad(got)
                if on_bad is not None:
                    on_bad(got)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # connection may already be closed
                pass
