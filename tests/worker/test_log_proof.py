"""A step's log records go out without ack requests; the result's companion proves them.

`FencedRecorder` sends each log record (JM_LOG) with no reply subject and holds the
latest back: at `finish` that one asks for the ack, beside the result. nats-server takes
one connection's messages to one stream in order, so that single ack covers every
record of the step before it: once `finish` returns, the whole log is readable.
"""

from __future__ import annotations

import asyncio
import json

from jetmesh.agents.worker import FencedRecorder
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger, is_log_seq
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams

RECORDS = 300


def model_call(step: str, i: int) -> ev.ModelCalledData:
    return ev.ModelCalledData(step_id=step, agent="t", worker="w1", purpose="step",
                              provider="sim", model="dry-run", input_tokens=i,
                              output_tokens=1, cost_usd=0.0, latency_ms=0.1,
                              response={"text": f"call {i}"})


async def test_one_ack_proves_a_finished_steps_whole_log(fresh_server: EmbeddedNats) -> None:
    nc = await connect(fresh_server.url)
    watch = await connect(fresh_server.url)
    try:
        js = jetstream(nc)
        await declare_streams(js)
        ledger = Ledger(nc, js)
        log_acks: list[int] = []

        async def on_any(msg) -> None:  # every message through the server, as the census
            if msg.data[:8] == b'{"stream' and json.loads(msg.data).get("stream") \
                    == subjects.STREAM_LOG:
                log_acks.append(json.loads(msg.data)["seq"])

        spy = await watch.subscribe(">", cb=on_any)
        await watch.flush()
        tid = ev.new_id()
        rec = FencedRecorder(ledger, tid, "s1", "jetmesh/agent/t", 0, "w1")
        await rec.record_start(ev.StepStarted(subject=tid, data=ev.StepStartedData(
            step_id="s1", agent="t", worker="w1", claim=False)))
        for i in range(RECORDS):
            await rec.record_model_call(model_call("s1", i))
        await rec.finish(ev.StepCompleted(subject=tid, data=ev.StepCompletedData(
            step_id="s1", agent="t", output={"ok": True}, worker="w1")))
        # Read at once, no waiting: the result returned, so every record is stored.
        entries = await ledger.read_step(tid, "s1")
        logs = [e for e in entries if is_log_seq(e.seq)]
        assert len(logs) == RECORDS + 1
        assert [e.event.data.input_tokens for e in logs[1:]] == list(range(RECORDS))
        # (The result and the last record were sent together, to two streams: either
        # may be stored first.)
        assert [type(e.event) for e in entries if not is_log_seq(e.seq)] == [ev.StepCompleted]
        await watch.flush()
        await nc.flush()
        # One ack came back for the whole log: the last record's.
        assert log_acks == [logs[-1].seq - (1 << 40)]
        await spy.unsubscribe()
    finally:
        await nc.close()
        await watch.close()


async def test_a_held_record_goes_out_by_itself(bus) -> None:
    """A step that records a call and then waits (a slow read-only tool) sends the held
    record within `hold_s`; one that ends without a result sends it when closed."""
    tid = ev.new_id()
    rec = FencedRecorder(bus.ledger, tid, "s1", "jetmesh/agent/t", 0, "w1", hold_s=0.05)
    await rec.record_model_call(model_call("s1", 7))
    log = subjects.step_log(tid, "s1")
    for _ in range(200):  # the record is due after 50 ms: look until it is there
        if await bus.ledger.read(tid, subject=log):
            break
        await asyncio.sleep(0.02)
    got = await bus.ledger.read(tid, subject=log)
    assert [e.event.data.input_tokens for e in got] == [7]

    rec2 = FencedRecorder(bus.ledger, tid, "s2", "jetmesh/agent/t", 0, "w1", hold_s=3600)
    await rec2.record_model_call(model_call("s2", 8))
    await rec2.close()
    await bus.nc.flush()
    log2 = subjects.step_log(tid, "s2")
    for _ in range(100):
        if await bus.ledger.read(tid, subject=log2):
            break
        await asyncio.sleep(0.02)
    assert [e.event.data.input_tokens for e in await bus.ledger.read(tid, subject=log2)] == [8]
