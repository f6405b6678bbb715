"""A pull-consumer runner: decode at the edge, call a handler, map outcomes to acks.

This is the one place where a handler's result becomes ack / nak / term:

- handler returns               -> ack (unless it settled the message itself)
- raises `Reject(reason)`       -> dead letter with the reason, term (permanent)
- raises `Fenced`               -> nothing: another delivery owns the message now
- raises anything else          -> nak with exponential backoff; on the delivery after
                                   `max_deliver` the message is dead-lettered before the
                                   handler runs, so a poison message that crashes its
                                   process still ends in the DLQ. A failure of the bus
                                   itself (`is_transient`: timeouts, a lost connection,
                                   a server restarting) does not count toward
                                   `max_deliver`, up to `transient_limit` deliveries, so
                                   valid work is not dead-lettered while NATS restarts.

Before the handler, every message must pass `bus.wire.check_json` (size, UTF-8, lone
surrogates, NaN, nesting depth): one that does not is dead-lettered at once ("rejected
at the edge: ..."), so no handler ever parses bytes that could blow its stack.

Nothing escapes `_one`: dead-lettering is total (`bus.dlq`). If the letter cannot be
stored the message is nak'ed and comes back; once it has come back `dlq_retries` times
past `max_deliver` it is terminated with an error log, so even then it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats import errors as nats_errors
from nats.aio.msg import Msg
from nats.errors import MsgAlreadyAckdError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from jetmesh.bus import headers as hn
from jetmesh.bus import subjects
from jetmesh.bus.dlq import dead_letter
from jetmesh.bus.errors import LedgerReadError, LedgerWriteError
from jetmesh.bus.streams import ensure_consumer
from jetmesh.bus.tasks import cancel_and_wait
from jetmesh.bus.wire import MAX_MESSAGE_BYTES, WireError, check_json, safe_text

log = logging.getLogger("jetmesh.bus")


class Reject(Exception):
    """Permanent failure: the message is dead-lettered with this reason."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.reason = reason
        self.errors = errors or []
        super().__init__(reason)


def is_transient(e: BaseException) -> bool:
    """An error of the bus, not of the message: a timeout, a connection lost or not yet
    back, no responders while a server restarts. Such a failure says nothing about the
    message, so it does not count toward max_deliver."""
    return isinstance(e, TimeoutError | ConnectionError | LedgerReadError | LedgerWriteError
                      | nats_errors.ConnectionClosedError | nats_errors.NoServersError
                      | nats_errors.NoRespondersError | nats_errors.ConnectionReconnectingError
                      | nats_errors.StaleConnectionError | nats_errors.OutboundBufferLimitError)


class Fenced(Exception):
    """The handler lost ownership (its append was fenced out); do not ack."""


Handler = Callable[[Msg], Awaitable[None]]


def _describe(e: BaseException) -> str:
    """An exception as bounded, storable text, even if its own str() raises."""
    try:
        text = str(e) or repr(e)
    except Exception:
        text = f"<unprintable {type(e).__name__}>"
    return safe_text(text, 1_000)


@dataclass
class PullRunner:
    """Runs one durable pull consumer with bounded concurrency until stopped.

    Messages come from long-lived pull requests, each on its own reply subject under a
    private inbox, and each message is handled the moment it arrives. A request asks for
    as many messages as there is room for and lives `expires_s`; the next goes out when
    the open ones cover less than half the room. Statuses (404, 408, 409) end only the
    request they answer, so a late status of an old request never stalls a new one.
    (nats-py's `fetch` works in cycles on one inbox: a stale status from an earlier
    cycle made it hold a message until its 1 s deadline, up to a second between an idle
    task's steps.)
    """

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
    check_wire: bool = True
    """Refuse (dead-letter) a message `bus.wire.check_json` refuses, before the handler."""
    dlq_retries: int = 3
    """Deliveries past `max_deliver` during which a dead letter that could not be stored
    is retried (the message nak'ed); after them the message is terminated, logged."""
    expires_s: float = 2.0
    """Lifetime of one pull request. A request the server forgot (a restart) is given
    up a second after this, so a lost request costs at most that long."""
    _tasks: set[asyncio.Task[None]] = field(default_factory=set, init=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _loop_task: asyncio.Task[None] | None = field(default=None, init=False)
    _open: dict[str, list[float]] = field(default_factory=dict, init=False)
    """Open pull requests: reply token -> [messages still due, when it lapses]."""
    _pause_until: float = field(default=0.0, init=False)
    _n: int = field(default=0, init=False)
    transient_limit: int = 50
    """Deliveries a message may take when the failures beyond max_deliver were transient
    (`is_transient`: the bus, not the message). Counted in this process only: a process
    that restarts counts the deliveries before it as real failures."""
    _transient: dict[int, int] = field(default_factory=dict, init=False)
    """Stream sequence -> deliveries of it that failed transiently in this process."""

    @property
    def durable(self) -> str:
        assert self.config.durable_name
        return self.config.durable_name

    async def start(self) -> None:
        await ensure_consumer(self.js, self.stream, self.config)
        nc = self.js._nc
        self._next = subjects.consumer_next(self.js._prefix, self.stream, self.durable)
        self._wake = asyncio.Event()
        self._inbox = nc.new_inbox()
        self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        self._loop_task = asyncio.create_task(self._loop(), name=f"pull:{self.durable}")

    def _due(self) -> int:
        return int(sum(r[0] for r in self._open.values()))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        nc = self.js._nc
        while not self._stopping.is_set():
            self._wake.clear()
            now = loop.time()
            for token, (_, lapses) in list(self._open.items()):
                if now > lapses:  # never ended by the server (it restarted): give it up
                    del self._open[token]
            room = self.concurrency - len(self._tasks) - self._due()
            if now < self._pause_until:
                await asyncio.sleep(self._pause_until - now)
                continue
            if room > 0 and room * 2 >= self.concurrency - len(self._tasks):
                self._n += 1
                token = str(self._n)
                req = {"batch": room, "expires": int(self.expires_s * 1e9)}
                try:
                    await nc.publish(self._next, json.dumps(req).encode(),
                                     reply=f"{self._inbox}.{token}")
                except Exception as e:  # connection blips: the client reconnects
                    log.debug("pull request on %s: %s", self.durable, e)
                    await asyncio.sleep(0.2)
                    continue
                self._open[token] = [room, now + self.expires_s + 1.0]
            # Woken when a handler finishes or a request ends; else look again when the
            # oldest open request should have ended.
            timeout = min((r[1] for r in self._open.values()), default=now + 1.0) - now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.01, timeout))

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:  # the server's status for one pull request, sent to its inbox
            token = msg.subject.rsplit(".", 1)[-1]
            status = (msg.headers or {}).get(hn.STATUS, "")
            if status == "100":  # heartbeat
                return
            if self._open.pop(token, None) is not None:
                if status not in ("404", "408"):  # 409 and the like: not in a tight loop
                    log.debug("pull request on %s ended: %s %s", self.durable, status,
                              (msg.headers or {}).get(hn.DESCRIPTION, ""))
                    self._pause_until = asyncio.get_running_loop().time() + 0.2
                self._wake.set()
            return
        if self._stopping.is_set():  # hand it back at once rather than at ack_wait
            with contextlib.suppress(Exception):
                await msg.nak()
            return
        # A delivered message carries its stream subject, not the request's: charge it
        # to the oldest open request, which is the one the server is filling (FIFO).
        oldest = next(iter(self._open), None)
        if oldest is not None:
            req = self._open[oldest]
            req[0] -= 1
            if req[0] <= 0:
                del self._open[oldest]
                self._wake.set()
        t = asyncio.create_task(self._one(msg))
        self._tasks.add(t)
        t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self._tasks.discard(t)
        self._wake.set()

    async def _one(self, msg: Msg) -> None:
        try:
            await self._settle(msg)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug in settling: never lose the message silently,
            try:                    # and never hand it back for ever either
                deliveries = int(msg.metadata.num_delivered)
            except Exception:
                deliveries = 0
            give_up = deliveries > self.max_deliver + self.dlq_retries
            log.error("%s: %s could not be settled (%s); %s", self.durable,
                      safe_text(msg.subject, 300), _describe(e),
                      f"DROPPED after {deliveries} deliveries" if give_up
                      else "handed back", exc_info=True)
            with contextlib.suppress(Exception):
                await (msg.term() if give_up else msg.nak(delay=self.backoff_s[-1]))
            if not isinstance(e, Exception):
                raise

    async def _settle(self, msg: Msg) -> None:
        try:
            # What the edge refuses is refused on any delivery, with its own reason.
            if len(msg.data) > self.max_bytes:
                await self._dead_letter(
                    msg, f"message of {len(msg.data)} bytes exceeds {self.max_bytes}")
                return
            if self.check_wire:
                try:
                    check_json(msg.data, max_bytes=self.max_bytes)
                except WireError as w:
                    await self._dead_letter(msg, f"rejected at the edge: {w.reason}")
                    return
            deliveries = int(msg.metadata.num_delivered)
            seq = int(msg.metadata.sequence.stream)
            # Deliveries that ended in a transient error (the bus was unreachable) do not
            # count toward max_deliver, up to transient_limit in all.
            transient = self._transient.get(seq, 0)
            if deliveries - transient > self.max_deliver or deliveries > self.transient_limit:
                self._transient.pop(seq, None)
                also = f", {transient} more failed on the bus" if transient else ""
                await self._dead_letter(
                    msg, f"gave up after {min(deliveries - 1 - transient, self.max_deliver)} "
                    f"deliveries{also} (each attempt failed, crashed or timed out)")
                return
            await self.handler(msg)
            self._transient.pop(seq, None)
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
            seq = int(msg.metadata.sequence.stream)
            if is_transient(e):
                self._transient[seq] = self._transient.get(seq, 0) + 1
                while len(self._transient) > 100_000:
                    self._transient.pop(next(iter(self._transient)))
            counted = deliveries - self._transient.get(seq, 0)
            delay = self.backoff_s[min(max(counted, 1) - 1, len(self.backoff_s) - 1)]
            error = _describe(e)
            log.warning("%s: %s failed (delivery %d), retry in %.1fs: %s", self.durable,
                        msg.subject, deliveries, delay, error,
                        exc_info=log.isEnabledFor(10))
            if counted >= self.max_deliver or deliveries >= self.transient_limit:
                self._transient.pop(seq, None)
                await self._dead_letter(msg, f"failed {deliveries} times; last error: {error}")
            else:
                with contextlib.suppress(Exception):
                    await msg.nak(delay=delay)

    async def _dead_letter(self, msg: Msg, reason: str,
                           errors: list[dict[str, Any]] | None = None) -> None:
        """Dead-letter `msg` (total: see bus.dlq.dead_letter); the hook runs only once
        the letter is stored."""
        try:
            deliveries = int(msg.metadata.num_delivered)
        except Exception:
            deliveries = 0
        letter = await dead_letter(
            self.js, msg, self.stream, self.durable, reason, errors,
            drop_if_unstored=deliveries > self.max_deliver + self.dlq_retries,
            nak_delay_s=self.backoff_s[-1])
        if letter is not None and self.on_dead_letter is not None:
            try:
                await self.on_dead_letter(msg, letter.reason)
            except Exception as e:  # the letter is kept; the hook is a courtesy
                log.warning("%s: dead-letter hook failed: %s", self.durable,
                            safe_text(e, 500))

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop pulling; let in-flight handlers finish for `grace_s`, then cancel them.

        The inbox is drained first: the server stops delivering to our open requests,
        and what already arrived is handed back at once (nak) rather than at ack_wait."""
        self._stopping.set()
        await cancel_and_wait(self._loop_task)
        with contextlib.suppress(Exception):
            # Bounded: nats-py's drain waits, with no limit, until every message queued
            # on the inbox has been through its callback.
            await asyncio.wait_for(self._sub.drain(), max(1.0, grace_s))  # type: ignore[no-untyped-call]
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
