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
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.errors import TimeoutError as NatsTimeoutError
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
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _loop_task: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def durable(self) -> str:
        assert self.config.durable_name
        return self.config.durable_name

    async def start(self) -> None:
        await ensure_consumer(self.js, self.stream, self.config)
        self._sub = await self.js.pull_subscribe_bind(
            durable=self.durable, stream=self.stream
        )
        self._room = asyncio.Event()
        self._room.set()
        self._loop_task = asyncio.create_task(self._loop(), name=f"pull:{self.durable}")

    async def _loop(self) -> None:
        while not self._stopping.is_set():
            free = self.concurrency - len(self._tasks)  # how many we may take now
            if free <= 0:
                self._room.clear()
                await self._room.wait()  # set when a handler finishes
                continue
            try:
                msgs = await self._sub.fetch(batch=min(free, 256), timeout=1.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # connection blips: the client reconnects
                log.debug("fetch on %s: %s", self.durable, e)
                await asyncio.sleep(0.2)
                continue
            for msg in msgs:
                t = asyncio.create_task(self._one(msg))
                self._tasks.add(t)
                t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self._tasks.discard(t)
        self._room.set()

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
