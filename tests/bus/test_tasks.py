"""Stopping loops whose cancel can be lost (asyncio.wait_for on Python 3.11)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from jetmesh.bus import subjects
from jetmesh.bus.presence import Presence
from jetmesh.bus.tasks import cancel_and_wait


class Beats:
    """A loop body that waits through asyncio.wait_for, as nats-py's publishes do; the
    test completes the awaited future in the same turn as it cancels the loop."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[None]] = []
        self.waiting = asyncio.Event()
        self.beats = 0

    async def beat(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        self.waiting.set()
        await asyncio.wait_for(fut, 10)
        self.beats += 1

    async def forever(self) -> None:
        while True:
            await self.beat()

    async def cancel_as_it_completes(self, task: asyncio.Task[Any]) -> None:
        await self.waiting.wait()
        self.futures[-1].set_result(None)
        task.cancel()


async def finishes(coro: Any, timeout: float = 5.0) -> bool:
    """Whether `coro` finishes within `timeout`. Unlike wait_for, it does not cancel it
    at the deadline (that cancel would be the second one the loop needs)."""
    stopper = asyncio.ensure_future(coro)
    done, _ = await asyncio.wait({stopper}, timeout=timeout)
    return bool(done)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was fixed in 3.12")
async def test_a_cancel_landing_as_wait_for_completes_is_lost_on_this_python() -> None:
    """Why the helper exists: cancel then await would never return here."""
    beats = Beats()
    task = asyncio.create_task(beats.forever())
    await beats.cancel_as_it_completes(task)
    done, _ = await asyncio.wait({task}, timeout=0.5)
    assert not done, "the cancel took; the hazard is gone"
    assert beats.beats >= 1  # it went on beating after the cancel
    task.cancel()  # no future completes now: this one takes
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancel_and_wait_stops_a_loop_that_lost_its_cancel() -> None:
    beats = Beats()
    task = asyncio.create_task(beats.forever())
    await beats.waiting.wait()
    beats.futures[-1].set_result(None)
    assert await finishes(cancel_and_wait(task, None))
    assert task.done()


async def test_cancel_and_wait_keeps_the_tasks_errors_to_itself() -> None:
    async def boom() -> None:
        raise RuntimeError("x")

    task = asyncio.create_task(boom())
    await asyncio.wait({task})
    await cancel_and_wait(task)  # does not raise, and the error counts as retrieved
    assert isinstance(task.exception(), RuntimeError)


async def test_presence_stop_returns_when_its_heartbeat_swallows_the_cancel(bus) -> None:
    beats = Beats()
    presence = Presence(bus.js, subjects.BUCKET_AGENTS, "tasks-test.r1", dict,
                        interval_s=0.0)
    await presence.start()
    presence.beat = beats.beat  # type: ignore[method-assign]
    assert presence._task is not None
    await beats.waiting.wait()
    beats.futures[-1].set_result(None)
    assert await finishes(presence.stop())
    assert presence._task.done()
