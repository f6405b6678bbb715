"""A2A push notifications, delivered durably from the ledger.

The SDK's ports do the A2A work: `KvPushConfigStore` is a `PushNotificationConfigStore`
on the NATS KV bucket `jm-a2a-push` (so configs outlive a gateway), and each event is
POSTed by the SDK's `BasePushNotificationSender` (the config's ``token`` as
``X-A2A-Notification-Token``, its ``authentication`` as ``Authorization: <scheme>
<credentials>``, the body a `StreamResponse`).

Delivery is jetmesh's: one deliverer per config follows the task's ledger from a cursor
kept in the same bucket (``cur.<task>.<config>``: the last sequence the webhook accepted
with a 2xx). An event that fails is retried with backoff until it is accepted or the
config is deleted; the cursor moves only after a 2xx, so a gateway killed and started
again goes on from the first event not yet accepted. Every event carries its ledger
sequence (``metadata.jetmesh.seq``): the only repeat possible is the one event in flight
when a gateway died after the webhook answered and before the cursor was written; a
receiver that keeps the last sequence per task drops it. Run delivery in one gateway
(``JETMESH_GATEWAY_PUSH_DELIVERY=false`` on the others): replicas do not share the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from a2a.server.context import ServerCallContext
from a2a.server.tasks import BasePushNotificationSender, PushNotificationConfigStore
from a2a.server.tasks.push_notification_config_store import normalize_push_notification_config
from a2a.types import TaskPushNotificationConfig
from a2a.utils.errors import InvalidParamsError
from google.protobuf.json_format import MessageToJson, Parse
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.settings import BusSettings
from jetmesh.orchestrator.state import TaskState, fold

from .tasks import entry_event, upto

__all__ = ["KvPushConfigStore", "PushNotifications", "check_push_config"]

log = logging.getLogger("jetmesh.gateway.push")

_CONFIG = "cfg"
_CURSOR = "cur"


def check_push_config(config: TaskPushNotificationConfig) -> None:
    """A push config the gateway can deliver to (InvalidParamsError why not)."""
    if not config.url.startswith(("http://", "https://")):
        raise InvalidParamsError(message="push notification url must be http(s)")
    if config.id:
        try:
            subjects.check_id(config.id, "push notification config id")
        except subjects.InvalidIdError as e:
            raise InvalidParamsError(message=str(e)) from e


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
        config: TaskPushNotificationConfig = Parse(entry.value.decode(),
                                                   TaskPushNotificationConfig())
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

    async def cursor(self, task_id: str, config_id: str) -> int | None:
        try:
            entry = await self.kv.get(_key(_CURSOR, task_id, config_id))
        except KeyNotFoundError:
            return None
        return int(entry.value or b"0")

    async def set_cursor(self, task_id: str, config_id: str, seq: int) -> None:
        await self.kv.put(_key(_CURSOR, task_id, config_id), str(seq).encode())


class PushNotifications:
    """The store, the SDK's sender and one deliverer task per config."""

    def __init__(self, js: JetStreamContext, ledger: Ledger, store: KvPushConfigStore, *,
                 http: httpx.AsyncClient | None = None,
                 url_validator: Callable[[str], Awaitable[bool]] | None = None,
                 deliver: bool = True, max_backoff_s: float = 10.0) -> None:
        self.js = js
        self.ledger = ledger
        self.store = store
        self.http = http or httpx.AsyncClient(timeout=10.0)
        self.sender = BasePushNotificationSender(self.http, store,
                                                 push_url_validator=url_validator)
        self.deliver = deliver
        self.max_backoff_s = max_backoff_s
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}

    @classmethod
    async def open(cls, js: JetStreamContext, ledger: Ledger, **kw: Any) -> PushNotifications:
        push = cls(js, ledger, await KvPushConfigStore.open(js), **kw)
        if push.deliver:
            for key in await push.store.keys(f"{_CONFIG}.*.*"):
                _, task_id, config_id = key.split(".")
                push._start(task_id, config_id)
        return push

    async def register(self, task_id: str, config: TaskPushNotificationConfig,
                       context: ServerCallContext, *, from_seq: int
                       ) -> TaskPushNotificationConfig:
        """Store `config` and deliver the task's events from `from_seq` on (a config
        set again keeps its cursor)."""
        check_push_config(config)
        stored = await self.store.set_info(task_id, config, context)
        if await self.store.cursor(task_id, stored.id) is None:
            await self.store.set_cursor(task_id, stored.id, from_seq - 1)
        if self.deliver:
            self._start(task_id, stored.id)
        return stored

    def _start(self, task_id: str, config_id: str) -> None:
        key = (task_id, config_id)
        running = self._running.get(key)
        if running is None or running.done():
            self._running[key] = asyncio.create_task(self._deliver(task_id, config_id),
                                                     name=f"push-{task_id}-{config_id}")

    async def _deliver(self, task_id: str, config_id: str) -> None:
        try:
            cursor = await self.store.cursor(task_id, config_id) or 0
            state: TaskState = fold(task_id, upto(list(await self.ledger.read(task_id)),
                                                  cursor))
            if state.terminal:
                return
            async for entry in self.ledger.follow(task_id, from_seq=cursor + 1):
                fold(task_id, [entry], state)
                if not await self._send_until_accepted(task_id, config_id,
                                                       entry_event(state, entry)):
                    return  # the config was deleted
                await self.store.set_cursor(task_id, config_id, entry.seq)
                if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("push delivery for task %s (config %s) stopped", task_id,
                          config_id)

    async def _send_until_accepted(self, task_id: str, config_id: str, event: Any) -> bool:
        pause = 0.1
        while True:
            config = await self.store.get_one(task_id, config_id)
            if config is None:
                return False
            if await self.sender._dispatch_notification(event, config, task_id):
                return True
            log.info("push to %s for task %s refused or failed; retrying in %.1fs",
                     config.url, task_id, pause)
            await asyncio.sleep(pause)  # backoff between retries of a failed delivery
            pause = min(pause * 2, self.max_backoff_s)

    async def close(self) -> None:
        tasks = list(self._running.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.http.aclose()
