"""Liveness on NATS KV: each replica heartbeats its entry; readers drop silent ones.

An entry is live while its last heartbeat is younger than the TTL. Expiry is judged by
the reader from the entry's own write time, so a replica killed with SIGKILL (which
never deletes its key) drops out within the TTL with no help from anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.bus.wire import WireError, decode_json

log = logging.getLogger("jetmesh.bus")


async def ensure_bucket(js: JetStreamContext, bucket: str, *, replicas: int = 1,
                        max_age_s: float = 3600.0) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        return await js.create_key_value(KeyValueConfig(
            bucket=bucket, history=1, ttl=max_age_s, storage=StorageType.FILE,
            replicas=replicas))


@dataclass
class Presence:
    """Keeps one key alive by rewriting it every `interval_s` until stopped."""

    js: JetStreamContext
    bucket: str
    key: str
    value: Callable[[], dict[str, Any]]
    interval_s: float = 1.0
    replicas: int = 1
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._kv = await ensure_bucket(self.js, self.bucket, replicas=self.replicas)
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name=f"presence:{self.key}")

    async def beat(self) -> None:
        await self._kv.put(self.key, json.dumps(self.value()).encode())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.beat()
            except Exception as e:  # reconnecting: the next beat retries
                log.debug("heartbeat %s: %s", self.key, e)

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self._kv.delete(self.key)


@dataclass(frozen=True)
class PresenceEntry:
    key: str
    value: dict[str, Any]
    updated: datetime


class PresenceView:
    """A live view of a presence bucket, fed by a KV watcher."""

    def __init__(self, js: JetStreamContext, bucket: str, ttl_s: float = 5.0,
                 replicas: int = 1) -> None:
        self.js, self.bucket, self.ttl_s, self.replicas = js, bucket, ttl_s, replicas
        self._entries: dict[str, PresenceEntry] = {}
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    async def start(self) -> None:
        kv = await ensure_bucket(self.js, self.bucket, replicas=self.replicas)
        self._watcher = await kv.watchall()
        self._task = asyncio.create_task(self._loop(), name=f"presence-view:{self.bucket}")

    async def _loop(self) -> None:
        async for entry in self._watcher:
            if entry is None:  # initial values delivered
                self.changed.set()
                continue
            if entry.operation in ("DEL", "PURGE") or not entry.value:
                if self._entries.pop(entry.key, None) is not None:
                    self.changed.set()
            else:
                if entry.key not in self._entries:
                    self.changed.set()
                try:  # bounded parse (bus.wire): a deep value must not kill this loop
                    value = decode_json(entry.value)
                except WireError as e:
                    log.warning("presence %s: unreadable value for %s: %s", self.bucket,
                                entry.key, e.reason)
                    continue
                if not isinstance(value, dict):
                    log.warning("presence %s: value for %s is not an object", self.bucket,
                                entry.key)
                    continue
                created = entry.created if isinstance(entry.created, datetime) else None
                self._entries[entry.key] = PresenceEntry(
                    entry.key, value, created or datetime.now(UTC))

    def live(self, now: datetime | None = None) -> list[PresenceEntry]:
        now = now or datetime.now(UTC)
        horizon = now - timedelta(seconds=self.ttl_s)
        return [e for e in self._entries.values() if e.updated >= horizon]

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        with contextlib.suppress(Exception):
            await self._watcher.stop()  # type: ignore[no-untyped-call]
