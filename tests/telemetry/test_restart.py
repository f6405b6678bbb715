"""The telemetry role dies mid-task (no stop, no last ack) and another takes over its
durables: a task that ended before is not sent again, the task in flight at the restart
is read back whole at its end, a task begun afterwards is built from its deliveries;
the real OTLP receiver holds each expected span exactly once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter

from mesh_fixtures import wait_live

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.telemetry import TelemetryService, build_spans, task_trace_id

ORDERS = ["A1001", "A1002", "A1003"]


async def start_worker(url: str) -> Worker:
    spec = get_agent("support")
    nc = await connect(url)
    w = Worker(spec, SimModel(), nc, jetstream(nc), replica=f"support-{uuid.uuid4().hex[:6]}")
    await w.start()
    return w


async def stop_worker(w: Worker) -> None:
    await w.stop()
    await w.nc.close()


async def acked_up(js, durable: str) -> None:
    """Until the ledger durable has nothing delivered and unacknowledged."""
    deadline = time.monotonic() + 20
    while (await js.consumer_info(subjects.STREAM_LEDGER, durable)).num_ack_pending:
        assert time.monotonic() < deadline, "the telemetry role never acknowledged"
        await asyncio.sleep(0.05)


async def test_a_telemetry_role_killed_mid_task_and_replaced_exports_each_span_once(
        make_mesh, bus, receiver, monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "jetmesh-test")
    durable = f"telemetry-r-{uuid.uuid4().hex[:8]}"
    mesh = await make_mesh([], no_agent_wait_s=60)
    nc1 = await connect(bus.url)
    first = TelemetryService(nc1, jetstream(nc1), durable=durable, deliver_new=True,
                             flush_s=0.05)
    await first.start()
    second: TelemetryService | None = None
    nc2 = None
    worker = await start_worker(bus.url)
    try:
        await wait_live(bus.js, {"support"})
        before = await mesh.client.submit("orders", workflow="fanout",
                                          input={"order_ids": ORDERS})
        assert (await mesh.client.result(before, timeout=30)).status is TaskStatus.COMPLETED
        await receiver.wait_for(lambda spans: sum(
            s["trace_id"] == f"{task_trace_id(before, None):032x}" for s in spans) >= 15,
            what="the first task's spans")
        # The next task stops halfway: planned and dispatched, no worker to take it.
        await stop_worker(worker)
        during = await mesh.client.submit("orders", workflow="fanout",
                                          input={"order_ids": ORDERS})
        deadline = time.monotonic() + 20
        while not any(isinstance(e.event, ev.StepDispatched)
                      for e in await mesh.client.events(during)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await acked_up(bus.js, durable)  # its records so far: acknowledged, not exported
        # Killed: no stop, no last ack; its connection just goes.
        assert first._flusher is not None
        first._flusher.cancel()
        await nc1.close()
        first.sender.shutdown()
        nc2 = await connect(bus.url)
        second = TelemetryService(nc2, jetstream(nc2), durable=durable, deliver_new=True,
                                  flush_s=0.05)
        await second.start()
        worker = await start_worker(bus.url)
        assert (await mesh.client.result(during, timeout=60)).status is TaskStatus.COMPLETED
        after = await mesh.client.submit("orders", workflow="fanout",
                                         input={"order_ids": ORDERS})
        assert (await mesh.client.result(after, timeout=30)).status is TaskStatus.COMPLETED
        ids = {f"{task_trace_id(t, None):032x}": t for t in (before, during, after)}
        await receiver.wait_for(lambda spans: sum(s["trace_id"] in ids for s in spans)
                                >= 45, what="every span")
        await acked_up(bus.js, durable)
        spans = [s for s in receiver.spans() if s["trace_id"] in ids]
        counts = Counter((s["trace_id"], s["span_id"]) for s in spans)
        assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1]
        for trace_id, t in ids.items():
            expected = {f"{s.context.span_id:016x}": s.name
                        for s in build_spans(t, await mesh.client.events(t))}
            got = {s["span_id"]: s["name"] for s in spans if s["trace_id"] == trace_id}
            assert got == expected, t
        # The task in flight was read back whole; the one begun later came by delivery.
        assert first.built_by[before] == "deliveries"
        assert second.built_by[during] == "ledger"
        assert second.built_by[after] == "deliveries"
        assert before not in second.built_by
    finally:
        await stop_worker(worker)
        if second is not None:
            await second.stop()
        if nc2 is not None:
            await nc2.close()
        for stream in (subjects.STREAM_LEDGER, subjects.STREAM_LOG):
            try:
                await bus.js.delete_consumer(stream, durable)
            except Exception:
                pass
