"""A pull-consumer runner: decode at the edge, call a handler, map outcomes to acks.

This is the one place where a handler's result becomes ack / nak / term:

- handler returns               -> ack (unless it settled the message itself)
- raises `Reject(reason)`       -> dead letter with the reason, term (permanent)
- raises `Fenced`               -> nothing: another delivery owns the message now
- raises anything else          -> nak with exponential backoff (transient); on the
                                   delivery after `max_deliver` the message is dead-lettered
                                   before the handler runs, so a poison message that
                                   crashes its process still ends in the DLQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from jetmesh.bus.dlq import dead_letter
from jetmesh.bus.events import MAX_MESSAGE_BYTES
from jetmesh.bus.streams import ensure_consumer

log = logging.getLogger("jetmesh.bus")


class Reject(Exception):
    """Permanent failure: the message is dead-lettered with this reason."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.reason = reason
        self.errors = errors or []
        super().__init__(reason)


class Fenced(Exception):
    """The handler lost ownership (its append was fenced out); do not ack."""


Handler = Callable[[Msg], Awaitable[None]]


@dataclass
class PullRunner:
    """Runs one durable pull consumer with bounded concurrency until stopped."""

    js: JetStreamContext
    stream: str
    config: ConsumerConfig
    handler: Handler
    on_dead_letter: Callable[[Msg, str], Awaitable[None]] | None = None
    """Called (best effort) after a message was dead-lettered, with the reason."""
    concurrency: int = 64
    max_deliver: int = 5
    backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    max_bytes: int = MAX_MESSAGE_BYTES
    expires_s: float = 30.0
    """Lifetime of one pull request; the server ends it with a 408 and we ask again."""
    heartbeat_s: float = 2.0
    """The server's idle heartbeat on an open pull request. Silence for 2.5 of these
    (a restarted server forgot the request) makes us ask again."""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _loop_task: asyncio.Task[None] | None = field(default=None, init=False)
    _outstanding: int = field(default=0, init=False)
    _heard: float = field(default=0.0, init=False)
    _pause: float = field(default=0.0, init=False)

    @property
    def durable(self) -> str:
        assert self.config.durable_name
        return self.config.durable_name

    async def start(self) -> None:
        """Bind the consumer and start pulling.

        One long-lived pull request at a time, for as many messages as there is room
        for, on a private inbox: each message is handled the moment it arrives, and the
        next request goes out when this one is used up, expires, or falls silent.
        (nats-py's `fetch` returns in cycles; after a stale status from an earlier cycle
        it held a message until its 1 s deadline, which added up to a second between
        an idle task's steps.)
        """
        await ensure_consumer(self.js, self.stream, self.config)
        nc = self.js._nc
        self._next = f"{self.js._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{self.durable}"
        self._wake = asyncio.Event()
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(self._inbox, cb=self._on_msg)
        self._loop_task = asyncio.create_task(self._loop(), name=f"pull:{self.durable}")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        nc = self.js._nc
        while not self._stopping.is_set():
            self._wake.clear()
            if self._outstanding == 0:
                if self._pause:
                    await asyncio.sleep(self._pause)
                    self._pause = 0.0
                free = self.concurrency - len(self._tasks)  # how many we may take now
                if free > 0:
                    req = {"batch": free, "expires": int(self.expires_s * 1e9),
                           "idle_heartbeat": int(self.heartbeat_s * 1e9)}
                    try:
                        await nc.publish(self._next, json.dumps(req).encode(),
                                         reply=self._inbox)
                    except Exception as e:  # connection blips: the client reconnects
                        log.debug("pull request on %s: %s", self.durable, e)
                        await asyncio.sleep(0.2)
                        continue
                    self._outstanding, self._heard = free, loop.time()
            if self._outstanding == 0:
                await self._wake.wait()  # a handler finished: room for more
                continue
            silent_for = self.heartbeat_s * 2.5
            try:
                await asyncio.wait_for(self._wake.wait(),
                                       max(0.0, self._heard + silent_for - loop.time()))
            except TimeoutError:
                if loop.time() - self._heard >= silent_for:
                    log.debug("pull request on %s fell silent; asking again", self.durable)
                    self._outstanding = 0

    async def _on_msg(self, msg: Msg) -> None:
        self._heard = asyncio.get_running_loop().time()
        # The server's own status messages: no payload and no ack subject.
        status = (msg.headers or {}).get("Status") if not msg.data and not msg.reply else None
        if status:
            if status != "100":  # not a heartbeat: this request is over
                if status not in ("404", "408"):  # 409 and the like: not in a tight loop
                    log.debug("pull request on %s ended: %s %s", self.durable, status,
                              (msg.headers or {}).get("Description", ""))
                    self._pause = 0.2
                self._outstanding = 0
                self._wake.set()
            return
        if self._stopping.is_set():  # hand it back at once rather than at ack_wait
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        self._outstanding = max(0, self._outstanding - 1)
        t = asyncio.create_task(self._one(msg))
        self._tasks.add(t)
        t.add_done_callback(self._done)
        if self._outstanding == 0:
            self._wake.set()

    def _done(self, t: asyncio.Task[None]) -> None:
        self._tasks.discard(t)
        if self._outstanding == 0:
            self._wake.set()

    async def _one(self, msg: Msg) -> None:
        try:
            deliveries = int(msg.metadata.num_delivered)
            if deliveries > self.max_deliver:
                await self._dead_letter(
                    msg, f"gave up after {self.max_deliver} deliveries (each attempt "
                    "failed, crashed or timed out)")
                return
            if len(msg.data) > self.max_bytes:
                await self._dead_letter(
                    msg, f"message of {len(msg.data)} bytes exceeds {self.max_bytes}")
                return
            await self.handler(msg)
            with contextlib.suppress(MsgAlreadyAckdError):  # a handler may settle it
                await msg.ack()
        except Reject as r:
            await self._dead_letter(msg, r.reason, r.errors)
        except Fenced:
            log.info("%s: fenced out of %s; leaving it to the new owner", self.durable,
                     msg.subject)
        except asyncio.CancelledError:
            # Stopping: hand the message back at once rather than waiting for ack_wait.
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except Exception as e:
            deliveries = int(msg.metadata.num_delivered)
            delay = self.backoff_s[min(deliveries - 1, len(self.backoff_s) - 1)]
            log.warning("%s: %s failed (delivery %d), retry in %.1fs: %s", self.durable,
                        msg.subject, deliveries, delay, str(e) or repr(e),
                        exc_info=log.isEnabledFor(10))
            if deliveries >= self.max_deliver:
                await self._dead_letter(msg, f"failed {deliveries} times; last error: {e}")
            else:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=delay)

    async def _dead_letter(self, msg: Msg, reason: str,
                           errors: list[dict[str, Any]] | None = None) -> None:
        await dead_letter(self.js, msg, self.stream, self.durable, reason, errors)
        if self.on_dead_letter is not None:
            try:
                await self.on_dead_letter(msg, reason)
            except Exception as e:  # the letter is kept; the hook is a courtesy
                log.warning("%s: dead-letter hook failed: %s", self.durable, e)

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop fetching; let in-flight handlers finish for `grace_s`, then cancel them."""
        self._stopping.set()
        if self._loop_task:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._loop_task
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()
