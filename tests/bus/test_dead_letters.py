"""Malformed messages on a consumer are terminated and kept, with bytes and reason."""

from __future__ import annotations

import asyncio
import json

from nats.aio.msg import Msg
from pydantic import ValidationError

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.consumer import PullRunner, Reject
from jetmesh.bus.dlq import DeadLetter
from jetmesh.bus.streams import pull_consumer_config


async def read_dead_letters(bus, consumer: str, n: int) -> list[DeadLetter]:
    sub = await bus.js.subscribe(
        subjects.dlq(subjects.STREAM_WORK, consumer), ordered_consumer=True
    )
    out = []
    try:
        while len(out) < n:
            msg = await sub.next_msg(timeout=10)
            out.append(DeadLetter.model_validate_json(msg.data))
    finally:
        await sub.unsubscribe()
    return out


async def test_malformed_messages_land_in_dead_letters_and_consumer_keeps_going(bus) -> None:
    skill = "dlqtest" + ev.new_id()[:8]
    handled: list[ev.StepCommand] = []
    done = asyncio.Event()

    async def handler(msg: Msg) -> None:
        try:
            cmd = ev.StepCommand.model_validate_json(msg.data)
        except ValidationError as e:
            raise Reject("invalid step command", [
                {"loc": list(x["loc"]), "msg": x["msg"]} for x in e.errors()]) from e
        handled.append(cmd)
        if len(handled) == 2:
            done.set()

    runner = PullRunner(bus.js, subjects.STREAM_WORK,
                        pull_consumer_config(subjects.work_consumer(skill), subjects.work(skill)),
                        handler)
    await runner.start()
    try:
        good = ev.StepCommand(task_id="t1", step_id="s1", skill=skill, input={})
        await bus.js.publish(subjects.work(skill), good.model_dump_json().encode())
        await bus.js.publish(subjects.work(skill), b"\xffnot json",
                             headers={"X-Test": "1"})
        await bus.js.publish(subjects.work(skill), json.dumps({"task_id": "t9"}).encode())
        await bus.js.publish(subjects.work(skill),
                             good.model_copy(update={"step_id": "s2"}).model_dump_json().encode())
        await asyncio.wait_for(done.wait(), 10)
        letters = await read_dead_letters(bus, subjects.work_consumer(skill), 2)
    finally:
        await runner.stop()
    assert [c.step_id for c in handled] == ["s1", "s2"]
    by_data = {dl.data: dl for dl in letters}
    raw = by_data[b"\xffnot json"]
    # Not UTF-8: refused at the edge (bus.wire), before the handler parses it.
    assert raw.reason.startswith("rejected at the edge: not UTF-8"), raw.reason
    assert raw.headers.get("X-Test") == "1"
    missing = by_data[json.dumps({"task_id": "t9"}).encode()]
    assert missing.task_id == "t9"
    assert {tuple(e["loc"]) for e in missing.errors} >= {("step_id",), ("skill",), ("input",)}
    # Terminated, not redelivered: nothing is left pending on the work consumer.
    info = await bus.js.consumer_info(subjects.STREAM_WORK, subjects.work_consumer(skill))
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_poison_message_is_dead_lettered_after_max_deliveries(bus) -> None:
    skill = "poison" + ev.new_id()[:8]
    attempts = 0

    async def handler(msg: Msg) -> None:
        nonlocal attempts
        attempts += 1
        raise RuntimeError("downstream exploded")

    runner = PullRunner(bus.js, subjects.STREAM_WORK,
                        pull_consumer_config(subjects.work_consumer(skill), subjects.work(skill)),
                        handler, max_deliver=3, backoff_s=(0.01,))
    await runner.start()
    try:
        await bus.js.publish(subjects.work(skill), b'{"poison": true}')
        [letter] = await read_dead_letters(bus, subjects.work_consumer(skill), 1)
    finally:
        await runner.stop()
    assert attempts == 3
    assert letter.deliveries == 3
    assert "downstream exploded" in letter.reason
    assert letter.data == b'{"poison": true}'
