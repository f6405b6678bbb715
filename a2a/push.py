"""A2A push notifications, delivered durably from the ledger.

The SDK's ports do the A2A work: `KvPushConfigStore` is a `PushNotificationConfigStore`
on the NATS KV bucket `jm-a2a-push` (so configs outlive a gateway), and each event is
POSTed by the SDK's `BasePushNotificationSender` (the config's ``token`` as
``X-A2A-Notification-Token``, its ``authentication`` as ``Authorization: <scheme>
<credentials>``, the body a `StreamResponse`).

Delivery is jetmesh's, and safe with any number of gateways. One gateway at a time
delivers: the holder of the lease (key ``lease`` in the same bucket, value = the holder's
id and lease time). The holder renews it every third of the lease time with a
compare-and-set on its revision; every other gateway watches the key and takes it over
(compare-and-set again: one of them wins) when no renewal came for a whole lease time,
timed on its own clock (no clock comparison between hosts). A gateway stopped cleanly
deletes the lease, so another takes it at once; one restarted with the same
``JETMESH_GATEWAY_ID`` takes back its own lease at once (ids must be unique per live
gateway).

The holder watches the configs (``cfg.<task>.<config>``, whichever gateway stored them)
and runs one deliverer per config: it follows the task's ledger from a cursor kept in the
bucket (``cur.<task>.<config>``: the last sequence the webhook accepted with a 2xx; each
write is a compare-and-set, so a deliverer that lost the lease cannot move a cursor its
successor moved). An event that fails is retried with backoff until it is accepted or
the config is deleted; the cursor moves right after each 2xx, before the next event.

The contract: every event reaches the webhook, in ledger order, and each carries its
ledger sequence (``metadata.jetmesh.seq``). The one repeat possible is the event in
flight (POSTed, its 2xx not yet recorded in the cursor) when the delivering gateway dies
or loses its lease: its successor sends that one event again. A receiver that keeps the
last sequence per task (and config) drops it; nothing else is ever sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import nats.errors
from a2a.server.context import ServerCallContext
from a2a.server.tasks import BasePushNotificationSender, PushNotificationConfigStore
from a2a.server.tasks.push_notification_config_store import normalize_push_notification_config
from a2a.types import TaskPushNotificationConfig
from a2a.utils.errors import InvalidParamsError
from google.protobuf.json_format import MessageToJson, Parse, ParseError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from pydantic import BaseModel

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.settings import BusSettings
from jetmesh.orchestrator.state import TaskState, fold

from .pinning import PinnedPublicTransport
from .tasks import entry_event, upto

__all__ = ["Cursor", "KvPushConfigStore", "Lease", "PushNotifications", "check_push_config"]

log = logging.getLogger("jetmesh.gateway.push")

_CONFIG = "cfg"
_CURSOR = "cur"
_LEASE = "lease"
_END = "end"
_DEL, _PURGE = KV_DEL, KV_PURGE


def check_push_config(config: TaskPushNotificationConfig) -> None:
    """A push config the gateway can deliver to (InvalidParamsError why not)."""
    if not config.url.startswith(("http://", "https://")):
        raise InvalidParamsError(message="push notification url must be http(s)")
    if config.id:
        try:
            subjects.check_id(config.id, "push notification config id")
        except subjects.InvalidIdError as e:
            raise InvalidParamsError(message=str(e)) from e


def _is_id(value: str) -> bool:
    try:
        subjects.check_id(value)
    except subjects.InvalidIdError:
        return False
    return True


def _key(kind: str, task_id: str, config_id: str) -> str:
    return f"{kind}.{subjects.check_id(task_id, 'task id')}." \
           f"{subjects.check_id(config_id, 'config id')}"


class KvPushConfigStore(PushNotificationConfigStore):
    """Push configs in a KV bucket, one key ``cfg.<task>.<config id>`` each."""

    def __init__(self, js: JetStreamContext, kv: KeyValue) -> None:
        self.js = js
        self.kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext) -> KvPushConfigStore:
        kv = await ensure_bucket(js, subjects.BUCKET_A2A_PUSH, max_age_s=0.0,
                                 replicas=BusSettings().replicas)
        return cls(js, kv)

    async def keys(self, pattern: str) -> list[str]:
        """The live keys matching `pattern` (from the stream's subjects, in one request:
        see bridge.list_external on why not `kv.keys()`)."""
        bucket = subjects.BUCKET_A2A_PUSH
        prefix = subjects.kv_subject(bucket, "")
        info = await self.js.stream_info(subjects.kv_stream(bucket),
                                         subjects_filter=subjects.kv_subject(bucket, pattern))
        return sorted(s.removeprefix(prefix) for s in (info.state.subjects or {}))

    async def _get(self, key: str) -> TaskPushNotificationConfig | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            config: TaskPushNotificationConfig = Parse(entry.value.decode(),
                                                       TaskPushNotificationConfig())
        except (ValueError, ParseError) as e:  # corrupt, or not a gateway's: left as it is
            log.warning("push config %s does not parse (%s): ignored", key, e)
            return None
        return config

    async def set_info(self, task_id: str, notification_config: TaskPushNotificationConfig,
                       context: ServerCallContext) -> TaskPushNotificationConfig:
        stored = normalize_push_notification_config(task_id, notification_config)
        await self.kv.put(_key(_CONFIG, task_id, stored.id), MessageToJson(stored).encode())
        return stored

    async def get_info(self, task_id: str, context: ServerCallContext
                       ) -> list[TaskPushNotificationConfig]:
        return await self.get_info_for_dispatch(task_id)

    async def get_info_for_dispatch(self, task_id: str) -> list[TaskPushNotificationConfig]:
        out = []
        for key in await self.keys(f"{_CONFIG}.{subjects.check_id(task_id, 'task id')}.*"):
            cfg = await self._get(key)
            if cfg is not None:
                out.append(cfg)
        return out

    async def get_one(self, task_id: str, config_id: str) -> TaskPushNotificationConfig | None:
        return await self._get(_key(_CONFIG, task_id, config_id))

    async def delete_info(self, task_id: str, context: ServerCallContext,
                          config_id: str | None = None) -> None:
        ids = [config_id] if config_id else [
            c.id for c in await self.get_info_for_dispatch(task_id)]
        for cid in ids:
            with contextlib.suppress(KeyNotFoundError):
                await self.kv.delete(_key(_CONFIG, task_id, cid))

    async def cursor(self, task_id: str, config_id: str) -> Cursor | None:
        """Where delivery to a config stands (None: no cursor yet)."""
        try:
            entry = await self.kv.get(_key(_CURSOR, task_id, config_id))
        except KeyNotFoundError:
            return None
        seq, _, end = (entry.value or b"0").decode(errors="replace").partition(" ")
        if not seq.isdigit():  # corrupt: deliver from the task's start (repeats, no loss)
            log.warning("push cursor of task %s (config %s) is %s: delivering from the "
                        "start", task_id, config_id, ascii(entry.value)[:60])
            return Cursor(0, entry.revision or 0, False)
        return Cursor(int(seq), entry.revision or 0, end == _END)

    async def init_cursor(self, task_id: str, config_id: str, seq: int) -> None:
        """A cursor at `seq` unless the config has one already (it keeps it)."""
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self.kv.create(_key(_CURSOR, task_id, config_id), str(seq).encode())

    async def set_cursor(self, task_id: str, config_id: str, seq: int, *, last: int,
                         end: bool = False) -> int:
        """Move the cursor if it is still at revision `last` (KeyWrongLastSequenceError
        when another deliverer moved it); returns the new revision."""
        value = f"{seq} {_END}" if end else str(seq)
        return await self.kv.update(_key(_CURSOR, task_id, config_id), value.encode(),
                                    last=last)


@dataclass(frozen=True)
class Cursor:
    seq: int
    """The last ledger sequence the webhook accepted."""
    revision: int
    ended: bool
    """The task's terminal event was accepted: nothing more to deliver."""


class Lease(BaseModel):
    """The value of the delivery lease: who holds it, for how long after each renewal."""

    holder: str
    lease_s: float


def default_holder() -> str:
    """A gateway id unique to this process."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class _LeaseLost(Exception):
    pass


class PushNotifications:
    """The store, the SDK's sender, the delivery lease and (while this gateway holds it)
    one deliverer task per config."""

    def __init__(self, js: JetStreamContext, ledger: Ledger, store: KvPushConfigStore, *,
                 http: httpx.AsyncClient | None = None,
                 url_validator: Callable[[str], Awaitable[bool]] | None = None,
                 deliver: bool = True, holder: str | None = None, lease_s: float = 5.0,
                 max_backoff_s: float = 10.0) -> None:
        if lease_s <= 0:
            raise ValueError("push lease time must be > 0")
        self.js = js
        self.ledger = ledger
        self.store = store
        # With the URL policy on, a connection goes to the very address it was checked
        # against (a2a/pinning: a DNS answer changed after the check is not followed).
        self.http = http or httpx.AsyncClient(
            timeout=10.0, transport=PinnedPublicTransport() if url_validator else None)
        self.url_validator = url_validator
        self.sender = BasePushNotificationSender(self.http, store,
                                                 push_url_validator=url_validator)
        self.deliver = deliver
        self.holder = holder or default_holder()
        self.lease_s = lease_s
        self.max_backoff_s = max_backoff_s
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._lease_rev: int | None = None
        self._valid_until = 0.0
        self._lead_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, js: JetStreamContext, ledger: Ledger, **kw: Any) -> PushNotifications:
        push = cls(js, ledger, await KvPushConfigStore.open(js), **kw)
        if push.deliver:
            push._lead_task = asyncio.create_task(push._lead(), name="push-lease")
        return push

    @property
    def leading(self) -> bool:
        """Whether this gateway holds the delivery lease (renewed within its time)."""
        return self._lease_rev is not None and time.monotonic() < self._valid_until

    async def check(self, config: TaskPushNotificationConfig) -> None:
        """`check_push_config`, and the URL policy (InvalidParamsError): a URL the
        deliverer would refuse is refused when it is set, not retried for ever."""
        check_push_config(config)
        if self.url_validator is not None and not await self.url_validator(config.url):
            raise InvalidParamsError(message=(
                f"push notification url {config.url[:200]!r} is not a public http(s) "
                "address (private, loopback, link-local or unresolvable; a gateway with "
                "JETMESH_GATEWAY_PUSH_PRIVATE_URLS=true allows them)"))

    async def register(self, task_id: str, config: TaskPushNotificationConfig,
                       context: ServerCallContext, *, from_seq: int
                       ) -> TaskPushNotificationConfig:
        """Store `config` and deliver the task's events from `from_seq` on (a config
        set again keeps its cursor). The lease holder, whichever gateway it is, sees the
        config in the bucket and delivers."""
        await self.check(config)
        stored = normalize_push_notification_config(task_id, config)
        await self.store.init_cursor(task_id, stored.id, from_seq - 1)  # before the config
        await self.store.set_info(task_id, stored, context)
        if self.leading:
            self._start(task_id, stored.id)
        return stored

    # ------------------------------------------------------------------ the lease

    def _lease_value(self) -> bytes:
        return Lease(holder=self.holder, lease_s=self.lease_s).model_dump_json().encode()

    async def lease_holder(self) -> str | None:
        """The id of the gateway holding the delivery lease (None: nobody)."""
        try:
            entry = await self.store.kv.get(_LEASE)
        except KeyNotFoundError:
            return None
        held = _parse_lease(entry.value)
        return held.holder if held else None

    async def _lead(self) -> None:
        """Take the lease, deliver while holding it, and start over when it is lost."""
        pause = 0.1
        while True:
            try:
                self._lease_rev, self._valid_until = await self._acquire()
                log.info("push delivery lease taken by %s", self.holder)
                pause = 0.1
                await self._while_leading()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the bus went away: try again
                log.warning("push delivery lease: %s; trying again in %.1fs", e, pause)
                await asyncio.sleep(pause)  # backoff before taking the lease again
                pause = min(pause * 2, self.lease_s)
            finally:
                self._lease_rev = None
                await self._stop_deliverers()

    async def _acquire(self) -> tuple[int, float]:
        """Take the lease: its revision, and until when (here) it is valid."""
        kv = self.store.kv
        while True:
            began = time.monotonic()
            with contextlib.suppress(KeyWrongLastSequenceError):
                return await kv.create(_LEASE, self._lease_value()), began + self.lease_s
            try:
                entry = await kv.get(_LEASE)
            except KeyNotFoundError:
                continue  # released since: create it
            held = _parse_lease(entry.value)
            rev: int | None = entry.revision or 0
            if held is not None and held.holder != self.holder:
                rev = await self._expired(rev or 0, held.lease_s)
                if rev is None:
                    continue  # released: create it
            began = time.monotonic()
            with contextlib.suppress(KeyWrongLastSequenceError):
                return (await kv.update(_LEASE, self._lease_value(), last=rev),
                        began + self.lease_s)

    async def _expired(self, revision: int, lease_s: float) -> int | None:
        """Wait (one watch of the key) until the lease goes a whole lease time without a
        renewal, timed here: the revision to take it over from; None when it is released
        (deleted) meanwhile."""
        watcher = await self.store.kv.watch(_LEASE)
        deadline = time.monotonic() + lease_s
        try:
            while (left := deadline - time.monotonic()) > 0:
                try:
                    entry = await watcher.updates(timeout=left)  # type: ignore[no-untyped-call]
                except NatsTimeoutError:
                    break
                if entry is None or (entry.revision or 0) <= revision:
                    continue
                if entry.operation in (_DEL, _PURGE):
                    return None
                revision = entry.revision or revision
                held = _parse_lease(entry.value)
                if held is None or held.holder == self.holder:
                    break
                deadline = time.monotonic() + held.lease_s  # renewed: wait again
            return revision
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _while_leading(self) -> None:
        """Deliver every config's events; return when the lease is lost."""
        watcher = await self.store.kv.watch(f"{_CONFIG}.>")
        feed = asyncio.create_task(self._feed(watcher), name="push-configs")
        try:
            while True:
                await asyncio.sleep(self.lease_s / 3)  # the renewal period
                began = time.monotonic()
                try:
                    self._lease_rev = await self.store.kv.update(
                        _LEASE, self._lease_value(), last=self._lease_rev)
                    self._valid_until = began + self.lease_s
                except KeyWrongLastSequenceError:
                    log.warning("push delivery lease lost by %s (another gateway took it)",
                                self.holder)
                    self._lease_rev = None
                    return
                except (NatsTimeoutError, nats.errors.Error) as e:
                    if not self.leading:
                        log.warning("push delivery lease not renewed (%s): %s stops "
                                    "delivering", e, self.holder)
                        return
        finally:
            feed.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await feed
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def _feed(self, watcher: KeyValue.KeyWatcher) -> None:
        """Start a deliverer for every config stored (now and later)."""
        async for entry in watcher:
            if entry is None or entry.operation in (_DEL, _PURGE) or not entry.value:
                continue
            parts = entry.key.split(".")
            if len(parts) != 3 or not all(_is_id(p) for p in parts[1:]):
                log.warning("push config key %s is not cfg.<task>.<config>: ignored",
                            ascii(entry.key)[:120])
                continue
            self._start(parts[1], parts[2])

    # ------------------------------------------------------------------ delivery

    def _start(self, task_id: str, config_id: str) -> None:
        key = (task_id, config_id)
        running = self._running.get(key)
        if running is None or running.done():
            self._running[key] = asyncio.create_task(self._deliver(task_id, config_id),
                                                     name=f"push-{task_id}-{config_id}")

    async def _deliver(self, task_id: str, config_id: str) -> None:
        try:
            while self.leading:
                try:
                    await self._deliver_from_cursor(task_id, config_id)
                    return
                except KeyWrongLastSequenceError:
                    # Another deliverer (a predecessor still finishing its last POST)
                    # moved the cursor: go on from where it is now.
                    log.info("push cursor of task %s (config %s) moved elsewhere; "
                             "reading it again", task_id, config_id)
        except asyncio.CancelledError:
            raise
        except _LeaseLost:
            log.info("push delivery for task %s (config %s) handed over", task_id, config_id)
        except Exception:
            log.exception("push delivery for task %s (config %s) stopped", task_id,
                          config_id)

    async def _deliver_from_cursor(self, task_id: str, config_id: str) -> None:
        cursor = await self.store.cursor(task_id, config_id)
        if cursor is None:
            await self.store.init_cursor(task_id, config_id, 0)
            cursor = await self.store.cursor(task_id, config_id)
        if cursor is None or cursor.ended:
            return
        rev = cursor.revision
        state: TaskState = fold(task_id, upto(list(await self.ledger.read(task_id)),
                                              cursor.seq))
        if state.terminal:
            return
        async for entry in self.ledger.follow(task_id, from_seq=cursor.seq + 1):
            fold(task_id, [entry], state)
            if not await self._send_until_accepted(task_id, config_id,
                                                   entry_event(state, entry)):
                return  # the config was deleted
            end = isinstance(entry.event, ev.TERMINAL_TASK_EVENTS)
            rev = await self.store.set_cursor(task_id, config_id, entry.seq, last=rev, end=end)
            if end:
                return

    async def _send_until_accepted(self, task_id: str, config_id: str, event: Any) -> bool:
        pause = 0.1
        while True:
            if not self.leading:
                raise _LeaseLost
            config = await self.store.get_one(task_id, config_id)
            if config is None:
                return False
            if await self.sender._dispatch_notification(event, config, task_id):
                return True
            log.info("push to %s for task %s refused or failed; retrying in %.1fs",
                     config.url, task_id, pause)
            await asyncio.sleep(pause)  # backoff between retries of a failed delivery
            pause = min(pause * 2, self.max_backoff_s)

    async def _stop_deliverers(self) -> None:
        tasks = list(self._running.values())
        self._running.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    async def close(self) -> None:
        """Stop delivering and release the lease (another gateway takes it at once)."""
        if self._lead_task is not None:
            self._lead_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._lead_task
            await self._release()
        await self._stop_deliverers()
        await self.http.aclose()

    async def _release(self) -> None:
        with contextlib.suppress(Exception):
            entry = await self.store.kv.get(_LEASE)
            held = _parse_lease(entry.value)
            if held is not None and held.holder == self.holder:
                await self.store.kv.delete(_LEASE, last=entry.revision)


def _parse_lease(value: bytes | None) -> Lease | None:
    if not value:
        return None
    try:
        return Lease.model_validate_json(value)
    except ValueError:
        return None
