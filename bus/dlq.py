"""Dead letters: a message a consumer cannot process is kept, with its bytes and the reason.

Dead-lettering is total: `make_dead_letter` returns a DeadLetter whose JSON can always
be written and read back, for any bytes, subject, headers, reason and errors (the bytes
travel as base64; every string is made encodable and bounded; the task id is taken
only if it is a valid id, from the subject or from a body that passed `bus.wire`). A
letter that would not fit in one message keeps a prefix of the bytes and says so
(`data_truncated`, `data_bytes`). `dead_letter` stores it and then terminates the
original; if the store fails it naks the original instead (so it comes back and
nothing is lost) and returns None. It raises nothing but CancelledError.

`list_dead_letters` skips (and reports, in `.skipped`) a DLQ entry that is not a letter.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel, Field

from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.errors import BusError
from jetmesh.bus.events import RESENT_HEADER, utcnow
from jetmesh.bus.ledger import Ledger, Skipped
from jetmesh.bus.wire import MAX_MESSAGE_BYTES, WireError, check_json, decode_json, safe_text

log = logging.getLogger("jetmesh.bus")

_MAX_ERRORS = 50
_MAX_HEADERS = 64
_ENVELOPE_ROOM = 64_000
"""Bytes kept for everything in a letter but its data (reason, errors, headers...)."""


class DeadLetter(BaseModel):
    """What lands on `jm.dlq.<stream>.<consumer>`."""

    stream: str
    consumer: str
    subject: str
    """The original subject."""
    stream_seq: int | None = None
    deliveries: int = 1
    reason: str
    errors: list[dict[str, Any]] = Field(default_factory=list)
    headers: dict[str, str] = Field(default_factory=dict)
    data_b64: str
    """The original message bytes, base64 (a prefix of them if `data_truncated`)."""
    data_truncated: bool = False
    """The original was too big for a letter: `data_b64` holds its first bytes only
    (the original is still in its stream at `stream_seq` unless that is a work queue)."""
    data_bytes: int | None = None
    """The original's size in bytes (set when truncated)."""
    task_id: str | None = None
    time: datetime = Field(default_factory=utcnow)

    @property
    def data(self) -> bytes:
        return base64.b64decode(self.data_b64)


class DeadLetters(list[tuple[int, DeadLetter]]):
    """What `list_dead_letters` returns: (DLQ sequence, letter) pairs, plus `skipped`:
    the DLQ entries that are not letters (kept in the DLQ)."""

    skipped: list[Skipped]

    def __init__(self, items: Iterable[tuple[int, DeadLetter]] = (),
                 skipped: Iterable[Skipped] = ()) -> None:
        super().__init__(items)
        self.skipped = list(skipped)


def _safe_id(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return subjects.check_id(value)
    except ValueError:
        return None


def _task_id(subject: str, data: bytes) -> str | None:
    """The task a message belongs to: from a ledger subject, else from a JSON body's
    `task_id` / `subject` (bounded parse, see bus.wire); None unless a valid id."""
    try:
        found = _safe_id(subjects.task_id_of(subject))
        if found is not None:
            return found
        body = decode_json(data)
        if isinstance(body, dict):
            return _safe_id(body.get("task_id")) or _safe_id(body.get("subject"))
    except Exception:  # WireError, or anything odd: no task id
        pass
    return None


def _safe_scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) < 2**63 else safe_text(value, 100)
    return safe_text(value, 500)


def _safe_errors(errors: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Validation errors reduced to what can always be stored: string keys, and scalars
    or a flat list (a `loc`) as values; anything else becomes its (bounded) text."""
    out: list[dict[str, Any]] = []
    try:
        for err in list(errors or [])[:_MAX_ERRORS]:
            clean: dict[str, Any] = {}
            items = err.items() if isinstance(err, dict) else [("msg", err)]
            for k, v in list(items)[:20]:
                if isinstance(v, list | tuple):
                    clean[safe_text(k, 100)] = [_safe_scalar(x) for x in list(v)[:20]]
                else:
                    clean[safe_text(k, 100)] = _safe_scalar(v)
            out.append(clean)
    except Exception as e:
        out.append({"msg": safe_text(f"errors could not be kept: {type(e).__name__}")})
    return out


def _safe_headers(msg: Msg) -> dict[str, str]:
    try:
        items = list((msg.headers or {}).items())[:_MAX_HEADERS]
        return {safe_text(k, 200): safe_text(v, 2_000) for k, v in items}
    except Exception:
        return {}


def make_dead_letter(
    msg: Msg, stream: str, consumer: str, reason: str,
    errors: list[dict[str, Any]] | None = None,
) -> DeadLetter:
    """The letter for `msg`. Total: for any message its JSON dump works, fits in one
    message and reads back."""
    seq: int | None = None
    deliveries = 1
    try:
        meta = msg.metadata
        seq = int(meta.sequence.stream)
        deliveries = int(meta.num_delivered)
    except Exception:  # a core (non-JetStream) message has no metadata
        pass
    try:
        data = bytes(msg.data or b"")
    except Exception:
        data = b""
    subject = safe_text(getattr(msg, "subject", ""), 1_000)
    base = {"stream": safe_text(stream, 200), "consumer": safe_text(consumer, 200),
            "subject": subject, "stream_seq": seq, "deliveries": deliveries,
            "task_id": _task_id(subject, data)}
    room = MAX_MESSAGE_BYTES - _ENVELOPE_ROOM
    kept = data if len(data) * 4 // 3 + 4 <= room else data[: room * 3 // 4]
    letter = DeadLetter(
        **base, reason=safe_text(reason), errors=_safe_errors(errors),
        headers=_safe_headers(msg), data_b64=base64.b64encode(kept).decode(),
        data_truncated=len(kept) < len(data),
        data_bytes=len(data) if len(kept) < len(data) else None)
    try:
        if len(letter.model_dump_json().encode()) <= MAX_MESSAGE_BYTES:
            return letter
    except Exception:
        pass
    # Cannot happen with the cleaning above; if it does, keep what is certain.
    return DeadLetter(**base, reason=safe_text(reason) + " (errors and headers dropped)",
                      data_b64=base64.b64encode(kept).decode(),
                      data_truncated=len(kept) < len(data),
                      data_bytes=len(data) if len(kept) < len(data) else None)


async def dead_letter(
    js: JetStreamContext, msg: Msg, stream: str, consumer: str, reason: str,
    errors: list[dict[str, Any]] | None = None, *, attempts: int = 3,
    drop_if_unstored: bool = False, nak_delay_s: float = 5.0,
) -> DeadLetter | None:
    """Store the dead letter (up to `attempts` tries), then terminate the original so it
    is never redelivered; return the letter.

    If it cannot be stored, the original is nak'ed (delayed by `nak_delay_s`) and None
    returned: it comes back, and nothing is lost. With `drop_if_unstored` (the caller
    has tried long enough), it is terminated instead, with an error log holding what
    the letter would have said. Raises nothing but CancelledError."""
    dl = make_dead_letter(msg, stream, consumer, reason, errors)
    msg_id = f"dlq-{dl.stream}-{dl.stream_seq}" if dl.stream_seq else None
    stored = False
    last: Exception | None = None
    for attempt in range(max(1, attempts)):
        try:
            await js.publish(
                subjects.dlq(stream, consumer), dl.model_dump_json().encode(),
                headers={hn.MSG_ID: msg_id} if msg_id else None,
            )
            stored = True
            break
        except asyncio.CancelledError:
            raise
        except Exception as e:
            last = e
            if attempt + 1 < attempts:
                await asyncio.sleep(0.2 * (attempt + 1))
    if stored:
        log.warning("dead letter %s/%s seq=%s: %s", stream, consumer, dl.stream_seq,
                    dl.reason)
        try:
            await msg.term()
        except Exception as e:  # kept; a redelivery is dead-lettered again (deduplicated)
            log.warning("dead letter %s/%s seq=%s: term failed: %s", stream, consumer,
                        dl.stream_seq, safe_text(e, 300))
        return dl
    if drop_if_unstored:
        log.error("DROPPED %s/%s seq=%s subject=%s (%d bytes): the dead letter could not "
                  "be stored (%s); reason was: %s", stream, consumer, dl.stream_seq,
                  dl.subject, len(dl.data), safe_text(last, 300), dl.reason)
        with contextlib.suppress(Exception):
            await msg.term()
        return None
    log.error("dead letter %s/%s seq=%s could not be stored (%s); handed back for "
              "redelivery: %s", stream, consumer, dl.stream_seq, safe_text(last, 300),
              dl.reason)
    with contextlib.suppress(Exception):
        await msg.nak(delay=nak_delay_s)
    return None


async def list_dead_letters(reader: object, *, stream: str | None = None,
                            task_id: str | None = None) -> DeadLetters:
    """Dead letters with their DLQ sequence numbers (oldest first); an entry that is not
    a letter is passed over, logged once and listed in the result's `skipped`."""
    assert isinstance(reader, Ledger)
    filt = subjects.dlq(stream, "*") if stream else subjects.ALL_DLQ
    raw = await reader._direct_batch_all(filt, stream=subjects.STREAM_DLQ)
    out = DeadLetters()
    for seq, subject, data in raw:
        try:
            dl = DeadLetter.model_validate_json(check_json(data))
        except Exception as e:
            reason = e.reason if isinstance(e, WireError) else \
                f"not a dead letter: {safe_text(e, 400)}"
            bad = Skipped(seq, safe_text(subject, 512), safe_text(reason, 500))
            reader.report_bad(bad, subjects.STREAM_DLQ)
            out.skipped.append(bad)
            continue
        if task_id is None or dl.task_id == task_id:
            out.append((seq, dl))
    return out


async def redrive(js: JetStreamContext, reader: object, seq: int) -> DeadLetter:
    """Publish a dead letter's original bytes and headers to its original subject again,
    then remove it from the DLQ. A new message id makes JetStream accept it again."""
    assert isinstance(reader, Ledger)
    msg = await js.get_msg(subjects.STREAM_DLQ, seq, direct=True)
    dl = DeadLetter.model_validate_json(check_json(msg.data or b"{}"))
    if dl.data_truncated:
        raise BusError(f"dead letter {seq} holds only the first {len(dl.data)} of "
                       f"{dl.data_bytes} bytes: it cannot be redriven")
    headers = {k: v for k, v in dl.headers.items() if not k.startswith(hn.NATS_PREFIX)}
    headers[hn.MSG_ID] = f"redrive-{subjects.STREAM_DLQ}-{seq}"
    headers[RESENT_HEADER] = "redrive"  # a step command: read the step's line first
    await js.publish(dl.subject, dl.data, headers=headers)
    await js.delete_msg(subjects.STREAM_DLQ, seq)
    return dl
