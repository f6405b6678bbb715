"""The pull runner: long-lived pull requests, each message handled as it arrives."""

from __future__ import annotations

import asyncio

from nats.aio.msg import Msg

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.consumer import PullRunner
from jetmesh.bus.streams import pull_consumer_config


async def until(cond, timeout: float = 10.0) -> None:
    """Wait for a state the runner reaches by itself (it signals nothing: polled,
    bounded)."""
    async with asyncio.timeout(timeout):
        while not cond():  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.01)


def runner_for(bus, skill: str, handler) -> PullRunner:
    return PullRunner(bus.js, subjects.STREAM_WORK,
                      pull_consumer_config(subjects.work_consumer(skill), subjects.work(skill)),
                      handler)


async def test_a_runner_replacing_a_stopped_one_on_the_same_durable_gets_every_message(
        bus) -> None:
    """The stopped runner's pull requests are still open on the server when the new one
    starts (same connection, as in a restarted role): none of the new messages may go
    to them, where they would wait out ack_wait (30 s) before redelivery."""
    skill = "runner" + ev.new_id()[:8]
    old_got: list[bytes] = []
    new_got: list[bytes] = []
    all_in = asyncio.Event()

    async def old(msg: Msg) -> None:
        old_got.append(msg.data)

    async def new(msg: Msg) -> None:
        new_got.append(msg.data)
        if len(new_got) == 10:
            all_in.set()

    first = runner_for(bus, skill, old)
    await first.start()
    await bus.js.publish(subjects.work(skill), b"0")
    await until(lambda: old_got == [b"0"])
    await until(lambda: bool(first._open))  # it holds an open request again
    await first.stop()
    second = runner_for(bus, skill, new)
    await second.start()
    try:
        for i in range(1, 11):
            await bus.js.publish(subjects.work(skill), str(i).encode())
        await asyncio.wait_for(all_in.wait(), 10)
    finally:
        await second.stop()
    assert sorted(new_got, key=int) == [str(i).encode() for i in range(1, 11)]
    assert old_got == [b"0"]


async def test_a_status_ends_only_the_request_it_answers(bus) -> None:
    """A late 404/408 of an earlier request must not end the open one (nats-py's fetch
    cycles shared one inbox, and such a status held a message for up to a second)."""
    skill = "status" + ev.new_id()[:8]
    got = asyncio.Event()

    async def handler(msg: Msg) -> None:
        got.set()

    runner = runner_for(bus, skill, handler)
    await runner.start()
    try:
        await until(lambda: bool(runner._open))
        [token] = list(runner._open)
        stale = Msg(_client=bus.nc, subject=f"{runner._inbox}.0", reply="", data=b"",
                    headers={"Status": "408", "Description": "Request Timeout"})
        await runner._on_msg(stale)
        assert list(runner._open) == [token]
        await bus.js.publish(subjects.work(skill), b"{}")
        await asyncio.wait_for(got.wait(), 10)
        # Its own request's end: it is dropped and a new one goes out.
        done = Msg(_client=bus.nc, subject=f"{runner._inbox}.{token}", reply="", data=b"",
                   headers={"Status": "408", "Description": "Request Timeout"})
        await runner._on_msg(done)
        assert token not in runner._open
        await until(lambda: bool(runner._open))
    finally:
        await runner.stop()


async def test_a_runner_with_little_room_keeps_pulling_as_its_handlers_finish(bus) -> None:
    """Room for 4 at a time, 60 messages: each finished handler makes room for the next
    message at once (were used-up requests not counted, it would wait for each request
    to expire, 2 s per 4 messages, and miss the 10 s bound)."""
    skill = "room" + ev.new_id()[:8]
    got: list[bytes] = []
    all_in = asyncio.Event()
    running = 0
    most = 0

    async def handler(msg: Msg) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0)
        running -= 1
        got.append(msg.data)
        if len(got) == 60:
            all_in.set()

    runner = PullRunner(bus.js, subjects.STREAM_WORK,
                        pull_consumer_config(subjects.work_consumer(skill), subjects.work(skill)),
                        handler, concurrency=4)
    await runner.start()
    try:
        for i in range(60):
            await bus.js.publish(subjects.work(skill), str(i).encode())
        await asyncio.wait_for(all_in.wait(), 10)
    finally:
        await runner.stop()
    assert sorted(got, key=int) == [str(i).encode() for i in range(60)]
    assert most <= 4


async def test_stop_returns_even_if_the_inbox_never_drains(bus) -> None:
    """nats-py's drain has no limit of its own; a stop (a SIGTERMed worker, say) must
    not hang on it."""
    runner = runner_for(bus, "runner" + ev.new_id()[:8], lambda msg: asyncio.sleep(0))
    await runner.start()
    real = runner._sub
    never = asyncio.Event()

    class Stuck:
        async def drain(self) -> None:
            await never.wait()

    runner._sub = Stuck()  # type: ignore[assignment]
    try:
        await asyncio.wait_for(runner.stop(grace_s=0.5), 5)
    finally:
        await real.unsubscribe()


async def test_transient_bus_failures_do_not_dead_letter_valid_work(bus) -> None:
    """A handler that times out on the bus 7 times (a server restarting) and then
    succeeds: past max_deliver=3, but transient failures do not count, so the message is
    handled, not dead-lettered. The same count of real errors dead-letters it."""
    import nats.errors

    flaky = "flaky" + ev.new_id()[:8]
    calls: dict[bytes, int] = {}
    handled: list[bytes] = []
    dead: list[tuple[bytes, str]] = []

    async def handler(msg: Msg) -> None:
        calls[msg.data] = calls.get(msg.data, 0) + 1
        if calls[msg.data] <= 7:
            if msg.data == b"bus":
                raise nats.errors.TimeoutError
            raise ValueError("a bug")
        handled.append(msg.data)

    async def on_dead(msg: Msg, reason: str) -> None:
        dead.append((msg.data, reason))

    runner = PullRunner(bus.js, subjects.STREAM_WORK,
                        pull_consumer_config(subjects.work_consumer(flaky), subjects.work(flaky)),
                        handler, on_dead_letter=on_dead, max_deliver=3,
                        backoff_s=(0.01,))
    await runner.start()
    try:
        await bus.js.publish(subjects.work(flaky), b"bus")
        await bus.js.publish(subjects.work(flaky), b"bug")
        await until(lambda: handled and dead, timeout=20)
    finally:
        await runner.stop()
    assert handled == [b"bus"] and calls[b"bus"] == 8
    assert [d for d, _ in dead] == [b"bug"] and calls[b"bug"] == 3
