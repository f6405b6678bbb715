"""Read a KV bucket's current values completely, in one pass.

nats-py's `kv.watch()` / `kv.keys()` decide that the initial values are all delivered
from `consumer_info().num_pending == 0 and delivered == 0`, checked right after the push
subscription starts: when the server has already pushed every value but the callback has
not run yet, the end marker comes first and the reader sees an empty (or short) bucket
(nats.py issue 842). `jetmesh stats` read 0 of 200 task records that way under load.

Here the end is known before reading (the stream's last message for the pattern) and
reached when a delivered message is at or past it with nothing pending: no race with a
callback. Live watchers (presence, the tasks projection, push configs) keep `kv.watch`:
they wait for later changes anyway; the kill switch loads its rules here first."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import datetime

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from . import subjects

_OPERATION = "KV-Operation"
"""The header nats KV puts on a delete or purge marker (a put has none)."""
_MARKER = "Nats-Marker-Reason"
"""The header of the markers nats-server 2.11+ places itself (expiry, removal)."""


@dataclass(frozen=True)
class KvEntry:
    key: str
    value: bytes
    revision: int
    created: datetime | None


async def current_entries(js: JetStreamContext, bucket: str, pattern: str = ">", *,
                          timeout_s: float = 5.0) -> list[KvEntry]:
    """Every live key of `bucket` matching `pattern` with its newest value, in stream
    order. Deleted, purged and expired keys, and empty values, are left out.

    The end is known before reading: the stream's last message matching `pattern` (one
    message get; none: nothing to read). An ordered consumer (the unnamed consumer
    create a KV reader may use, see bus/permissions) then delivers the last value per
    key in stream order until it has passed that message and has nothing pending."""
    prefix = subjects.kv_subject(bucket, "")
    stream, filter_subject = subjects.kv_stream(bucket), subjects.kv_subject(bucket, pattern)
    try:
        last = (await js.get_msg(stream, subject=filter_subject)).seq or 0
    except NotFoundError:
        return []
    queue: asyncio.Queue[Msg] = asyncio.Queue()

    async def take(msg: Msg) -> None:
        await queue.put(msg)

    sub = await js.subscribe(filter_subject, stream=stream, cb=take, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                             inactive_threshold=30.0)
    out: list[KvEntry] = []
    try:
        while True:
            try:
                msg = await asyncio.wait_for(queue.get(), timeout_s)
            except TimeoutError:
                # The last message expired or was purged before it was delivered.
                if not (await sub.consumer_info()).num_pending:
                    return out
                raise
            meta = msg.metadata
            headers = msg.headers or {}
            if _OPERATION not in headers and _MARKER not in headers and msg.data:
                out.append(KvEntry(msg.subject.removeprefix(prefix), msg.data,
                                   meta.sequence.stream, meta.timestamp))
            if meta.sequence.stream >= last and meta.num_pending == 0:
                return out
    finally:
        with contextlib.suppress(Exception):  # it goes when inactive anyway
            await sub.unsubscribe()
