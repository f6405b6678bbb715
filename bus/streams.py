"""Stream, consumer and bucket declarations: idempotent, drift is updated or reported."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    PersistMode,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, NotFoundError

from jetmesh.bus import subjects
from jetmesh.bus.errors import StreamConfigConflict
from jetmesh.bus.events import MAX_MESSAGE_BYTES
from jetmesh.bus.settings import BusSettings

log = logging.getLogger("jetmesh.bus")

# Fields we own on each stream; anything else the operator set is left alone.
_MANAGED = ("subjects", "retention", "storage", "num_replicas", "duplicate_window",
            "allow_direct", "max_msg_size", "discard")


def log_persist_mode(settings: BusSettings) -> PersistMode:
    """How JM_LOG persists: `async` under the balanced durability on one server (acks
    before the flush; nats-server allows it on R1 streams only), the default (fsync'd
    before the ack with `sync_interval: always`) under strict or on a cluster, where a
    quorum of replicas holds every acknowledged record."""
    if settings.durability == "balanced" and settings.replicas == 1:
        return PersistMode.ASYNC
    return PersistMode.DEFAULT


def stream_configs(settings: BusSettings | None = None) -> list[StreamConfig]:
    s = settings or BusSettings()

    def stream(name: str, subjects_: list[str], retention: RetentionPolicy, direct: bool,
               persist: PersistMode = PersistMode.DEFAULT) -> StreamConfig:
        return StreamConfig(
            name=name, subjects=subjects_, retention=retention, allow_direct=direct,
            storage=StorageType.FILE, num_replicas=s.replicas,
            duplicate_window=s.duplicate_window_s, max_msg_size=MAX_MESSAGE_BYTES,
            discard=DiscardPolicy.OLD, persist_mode=persist)

    return [
        stream(subjects.STREAM_TASKS, subjects.TASKS_SUBJECTS, RetentionPolicy.LIMITS, True),
        # The ledger before its log: a ledger declared before the split still lists the
        # log subjects, and they must leave it before JM_LOG may take them.
        stream(subjects.STREAM_LEDGER, subjects.LEDGER_SUBJECTS, RetentionPolicy.LIMITS, True),
        stream(subjects.STREAM_LOG, subjects.LOG_SUBJECTS, RetentionPolicy.LIMITS, True,
               log_persist_mode(s)),
        stream(subjects.STREAM_WORK, subjects.WORK_SUBJECTS, RetentionPolicy.WORK_QUEUE, False),
        stream(subjects.STREAM_DLQ, subjects.DLQ_SUBJECTS, RetentionPolicy.LIMITS, True),
    ]


@dataclass(frozen=True)
class DeclareReport:
    created: list[str]
    updated: list[str]
    unchanged: list[str]


def _differs(want: StreamConfig, have: StreamConfig) -> list[str]:
    out = []
    for f in _MANAGED:
        w, h = getattr(want, f), getattr(have, f)
        if f == "subjects":
            w, h = sorted(w or []), sorted(h or [])
        if f == "duplicate_window" and w is not None and h is not None:
            w, h = round(float(w), 3), round(float(h), 3)
        if w is not None and w != h:
            out.append(f"{f}: {h!r} -> {w!r}")
    return out


async def declare_streams(
    js: JetStreamContext, settings: BusSettings | None = None
) -> DeclareReport:
    """Create missing streams, update drifted ones, raise StreamConfigConflict otherwise.

    Only the admin may update a stream (bus/permissions): for every other role a drifted
    stream is a StreamConfigConflict that names it."""
    created, updated, unchanged = [], [], []
    for want in stream_configs(settings):
        assert want.name
        try:
            info = await js.stream_info(want.name)
        except NotFoundError:
            await js.add_stream(want)
            created.append(want.name)
            continue
        have_persist = PersistMode(info.config.persist_mode or PersistMode.DEFAULT)
        if want.persist_mode is not None and have_persist != want.persist_mode:
            # nats-server cannot change a stream's persist mode in place.
            log.warning("stream %s persists %s, the durability setting wants %s: it stays "
                        "%s until the stream is recreated", want.name, have_persist.value,
                        want.persist_mode.value, have_persist.value)
        diff = _differs(want, info.config)
        if not diff:
            unchanged.append(want.name)
            continue
        try:
            await js.update_stream(want)
        except APIError as e:
            raise StreamConfigConflict(
                want.name, f"cannot update ({'; '.join(diff)}): {e.description}"
            ) from e
        except NatsTimeoutError as e:
            # Only the admin role may update a stream: the server drops the request of
            # any other user (a permissions violation), so it times out.
            raise StreamConfigConflict(
                want.name, f"needs an update ({'; '.join(diff)}) that this user may not "
                           "make (no reply: only the admin role may update streams); "
                           "run `jetmesh up` or declare the streams as admin") from e
        log.warning("stream %s updated: %s", want.name, "; ".join(diff))
        updated.append(want.name)
    return DeclareReport(created, updated, unchanged)


def work_consumer_config(skill: str, settings: BusSettings | None = None,
                         tenant: str | None = None) -> ConsumerConfig:
    """The durable pull consumer shared by every replica serving `skill` (with `tenant`:
    by the replicas of that tenant's private agents, on `subjects.private_work`)."""
    s = settings or BusSettings()
    if tenant is not None:
        return pull_consumer_config(subjects.private_work_consumer(skill, tenant),
                                    subjects.private_work(skill, tenant), s)
    return pull_consumer_config(subjects.work_consumer(skill), subjects.work(skill), s)


def pull_consumer_config(
    durable: str, filter_subject: str, settings: BusSettings | None = None,
    *, deliver_new: bool = False,
) -> ConsumerConfig:
    s = settings or BusSettings()
    return ConsumerConfig(
        # Created by name: the server then checks the filter in the API subject
        # (CONSUMER.CREATE.<stream>.<name>.<filter>), which least-privilege users rely on.
        name=durable,
        durable_name=durable,
        filter_subject=filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=s.ack_wait_s,
        # Redelivery is bounded by our own runner (it dead-letters on the delivery after
        # max_deliver), so a poison message that crashes its worker still ends in the DLQ.
        max_deliver=-1,
        max_ack_pending=10_000,
        deliver_policy=DeliverPolicy.NEW if deliver_new else DeliverPolicy.ALL,
        num_replicas=s.replicas,
    )


async def ensure_consumer(js: JetStreamContext, stream: str, config: ConsumerConfig) -> None:
    """Create or update a durable consumer; an impossible change raises StreamConfigConflict."""
    try:
        await js.add_consumer(stream, config=config)
    except APIError as e:
        raise StreamConfigConflict(
            f"{stream}/{config.durable_name}", str(e.description)
        ) from e


async def declare_buckets(js: JetStreamContext, settings: BusSettings | None = None) -> None:
    """Create the KV buckets when missing, as their users would (agents registry,
    budgets, external agents). Run it as a role that may create streams (the admin:
    `jetmesh up`), so the roles that only read them find them there."""
    from jetmesh.bus.presence import ensure_bucket

    s = settings or BusSettings()
    await ensure_bucket(js, subjects.BUCKET_AGENTS, replicas=s.replicas)
    await ensure_bucket(js, subjects.BUCKET_BUDGETS, replicas=s.replicas, max_age_s=7 * 86400)
    await ensure_bucket(js, subjects.BUCKET_EXTERNAL, replicas=s.replicas, max_age_s=0.0)
    await ensure_bucket(js, subjects.BUCKET_STATS, replicas=s.replicas, max_age_s=30 * 86400)
    await ensure_bucket(js, subjects.BUCKET_TASKS, replicas=s.replicas, max_age_s=30 * 86400)
