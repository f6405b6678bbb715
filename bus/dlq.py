"""Dead letters: a message a consumer cannot process is kept, with its bytes and the reason."""

from __future__ import annotations

import base64
import json
import logging
from datetime import datetime
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel, Field

from jetmesh.bus import subjects
from jetmesh.bus.events import RESENT_HEADER, utcnow

log = logging.getLogger("jetmesh.bus")


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
    """The original message bytes, base64."""
    task_id: str | None = None
    time: datetime = Field(default_factory=utcnow)

    @property
    def data(self) -> bytes:
        return base64.b64decode(self.data_b64)


def make_dead_letter(
    msg: Msg, stream: str, consumer: str, reason: str,
    errors: list[dict[str, Any]] | None = None,
) -> DeadLetter:
    seq: int | None = None
    deliveries = 1
    try:
        meta = msg.metadata
        seq = int(meta.sequence.stream)
        deliveries = int(meta.num_delivered)
    except Exception:  # a core (non-JetStream) message has no metadata
        pass
    task_id = subjects.task_id_of(msg.subject)
    if task_id is None:
        try:
            body = json.loads(msg.data)
            if isinstance(body, dict):
                cand = body.get("task_id") or body.get("subject")
                task_id = cand if isinstance(cand, str) else None
        except ValueError:
            pass
    return DeadLetter(
        stream=stream, consumer=consumer, subject=msg.subject, stream_seq=seq,
        deliveries=deliveries, reason=reason, errors=errors or [],
        headers={k: str(v) for k, v in (msg.headers or {}).items()},
        data_b64=base64.b64encode(msg.data).decode(), task_id=task_id,
    )


async def dead_letter(
    js: JetStreamContext, msg: Msg, stream: str, consumer: str, reason: str,
    errors: list[dict[str, Any]] | None = None,
) -> DeadLetter:
    """Store the dead letter, then terminate the original so it is never redelivered."""
    dl = make_dead_letter(msg, stream, consumer, reason, errors)
    msg_id = f"dlq-{stream}-{dl.stream_seq}" if dl.stream_seq else None
    await js.publish(
        subjects.dlq(stream, consumer), dl.model_dump_json().encode(),
        headers={"Nats-Msg-Id": msg_id} if msg_id else None,
    )
    log.warning("dead letter %s/%s seq=%s: %s", stream, consumer, dl.stream_seq, reason)
    await msg.term()
    return dl


async def list_dead_letters(reader: object, *, stream: str | None = None,
                            task_id: str | None = None) -> list[tuple[int, DeadLetter]]:
    """Dead letters with their DLQ sequence numbers (oldest first)."""
    from jetmesh.bus.ledger import Ledger

    assert isinstance(reader, Ledger)
    filt = subjects.dlq(stream, "*") if stream else subjects.ALL_DLQ
    raw = await reader._direct_batch_all(filt, stream=subjects.STREAM_DLQ)
    out = []
    for seq, _subject, data in raw:
        dl = DeadLetter.model_validate_json(data)
        if task_id is None or dl.task_id == task_id:
            out.append((seq, dl))
    return out


async def redrive(js: JetStreamContext, reader: object, seq: int) -> DeadLetter:
    """Publish a dead letter's original bytes and headers to its original subject again,
    then remove it from the DLQ. A new message id makes JetStream accept it again."""
    from jetmesh.bus.ledger import Ledger

    assert isinstance(reader, Ledger)
    msg = await js.get_msg(subjects.STREAM_DLQ, seq, direct=True)
    dl = DeadLetter.model_validate_json(msg.data or b"{}")
    headers = {k: v for k, v in dl.headers.items() if not k.startswith("Nats-")}
    headers["Nats-Msg-Id"] = f"redrive-{subjects.STREAM_DLQ}-{seq}"
    headers[RESENT_HEADER] = "redrive"  # a step command: read the step's line first
    await js.publish(dl.subject, dl.data, headers=headers)
    await js.delete_msg(subjects.STREAM_DLQ, seq)
    return dl
