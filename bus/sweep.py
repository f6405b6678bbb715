"""Work nobody can take: step commands on a work subject with no consumer go to the DLQ.

The work stream keeps a message until a consumer acknowledges it (work-queue retention).
A command on a subject no consumer filters on (a skill that never existed, a typo, a
forged publish) would sit there forever, unseen. `sweep_unconsumed` moves every such
message older than a grace period to the dead letters (`jm.dlq.JM_WORK.unconsumed`)
with the reason, then deletes it from the work stream. A skill whose agents are down
still has its durable consumer, so its queued steps stay where they are: they wait for
an agent to come back (bounded by their task's deadline).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.dlq import DeadLetter
from jetmesh.bus.events import MAX_MESSAGE_BYTES
from jetmesh.bus.wire import safe_text

log = logging.getLogger("jetmesh.bus")

UNCONSUMED = subjects.DLQ_UNCONSUMED
"""The DLQ "consumer" name of swept work: `jm.dlq.JM_WORK.unconsumed`."""


@dataclass(frozen=True)
class Swept:
    subject: str
    seq: int


def _covered(subject: str, filters: set[str]) -> bool:
    """Whether a consumer filter (exact, `*` or `>` wildcards) matches `subject`."""
    parts = subject.split(".")
    for f in filters:
        fp = f.split(".")
        for i, tok in enumerate(fp):
            if tok == ">":
                if len(parts) > i:
                    return True
                break
            if i >= len(parts) or (tok != "*" and tok != parts[i]):
                break
        else:
            if len(fp) == len(parts):
                return True
    return False


async def sweep_unconsumed(js: JetStreamContext, *, older_than_s: float = 60.0,
                           stream: str = subjects.STREAM_WORK, limit: int = 1000
                           ) -> list[Swept]:
    """Dead-letter the messages of `stream` that no consumer can receive, if stored more
    than `older_than_s` ago (a consumer may be about to be created for a new skill).
    Returns what was moved. Safe to run from several processes at once: the letter's
    id is the original's sequence (stored once) and a delete of a deleted message is a
    no-op."""
    consumers = await js.consumers_info(stream)
    filters: set[str] = set()
    for c in consumers:
        cfg = c.config
        if cfg.filter_subject:
            filters.add(cfg.filter_subject)
        filters.update(cfg.filter_subjects or ())
        if not cfg.filter_subject and not cfg.filter_subjects:
            filters.add(">")
    info = await js.stream_info(stream, subjects_filter=">")
    orphaned = [s for s in (info.state.subjects or {}) if not _covered(s, filters)]
    cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s)
    moved: list[Swept] = []
    for subject in orphaned:
        seq = 0
        while len(moved) < limit:
            try:
                raw = await js.get_msg(stream, seq=seq + 1, subject=subject, next=True)
            except NotFoundError:
                break
            seq = int(raw.seq or 0)
            stored = raw.time
            if isinstance(stored, datetime) and stored.tzinfo and stored > cutoff:
                break  # too young; and every later one on this subject is younger
            data = raw.data or b""
            kept = data[: (MAX_MESSAGE_BYTES - 16_384) * 3 // 4]
            letter = DeadLetter(
                stream=stream, consumer=UNCONSUMED, subject=safe_text(subject, 1_000),
                stream_seq=seq, deliveries=0,
                reason=f"no consumer takes {safe_text(subject, 200)} (no agent offers "
                       f"this skill); kept here instead of waiting in {stream} forever",
                headers={safe_text(k, 200): safe_text(v, 2_000)
                         for k, v in list((raw.headers or {}).items())[:50]},
                data_b64=base64.b64encode(kept).decode(),
                data_truncated=len(kept) < len(data),
                data_bytes=len(data) if len(kept) < len(data) else None)
            await js.publish(subjects.dlq(stream, UNCONSUMED),
                             letter.model_dump_json().encode(),
                             headers={hn.MSG_ID: f"dlq-{stream}-{seq}"})
            try:
                await js.delete_msg(stream, seq)
            except NotFoundError:
                pass  # another sweeper was quicker
            log.warning("dead letter %s seq=%d: %s", stream, seq, letter.reason)
            moved.append(Swept(subject, seq))
    return moved
