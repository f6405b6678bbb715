"""`jetmesh telemetry` killed with SIGKILL during a batch of tasks and restarted: the
OTLP receiver (a real process) holds every expected span exactly once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from jetmesh.bus import subjects
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.telemetry import MAX_BATCH_TRACES, build_spans, task_trace_id

ORDERS = ["A1001", "A1002", "A1003"]
SPANS_PER_FANOUT = 15  # root, plan, 3 x (invoke_agent, 2 chat, execute_tool), merge chat
JETMESH = Path(sys.executable).parent / "jetmesh"


def start_telemetry(url: str, endpoint: str, durable: str, data_dir: Path, log: Path
                    ) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NATS_", "OTEL_", "JETMESH_"))}
    env.update({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
                "JETMESH_ACK_WAIT_S": "2",  # a killed process's messages come back soon
                "PYTHONUNBUFFERED": "1"})
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [str(JETMESH), "telemetry", "--url", url, "--durable", durable, "--new-only",
             "--data-dir", str(data_dir)],
            env=env, stdout=out, stderr=subprocess.STDOUT)
    finally:
        out.close()


def read_log(log: Path) -> str:
    return log.read_text(errors="replace")


async def wait_consumer(js, durable: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await js.consumer_info(subjects.STREAM_LEDGER, durable)
            return
        except Exception:
            pass
        assert proc.poll() is None, read_log(log)
        assert time.monotonic() < deadline, "the telemetry consumer never appeared"
        await asyncio.sleep(0.05)


async def run_campaign(make_mesh, receiver, bus, tmp_path: Path, tasks: int, kills_at: int,
                       seed: int) -> dict[str, int]:
    """Submit `tasks` fan-out tasks, paced, and kill -9 the telemetry role `kills_at`
    times, each when the receiver's count of traces passes a random point of the batch
    (so while it exports), restarting it at once."""
    rnd = random.Random(seed)
    mesh = await make_mesh(["support"])
    durable = f"telemetry-kill-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "telemetry.log"
    proc = start_telemetry(bus.url, receiver.endpoint, durable, tmp_path, log)
    kills = 0
    kill_times: list[float] = []
    try:
        await wait_consumer(bus.js, durable, proc, log)
        ids = [f"kill-{uuid.uuid4().hex[:10]}" for _ in range(tasks)]
        traces = {f"{task_trace_id(t, None):032x}": t for t in ids}

        async def submit_all() -> None:
            for t in ids:
                await mesh.client.submit("orders", workflow="fanout", task_id=t,
                                         input={"order_ids": ORDERS})
                await asyncio.sleep(rnd.uniform(0.02, 0.08))  # paced like clients

        submitting = asyncio.create_task(submit_all())

        def roots() -> int:
            return sum(1 for s in receiver.spans()
                       if s["trace_id"] in traces and s["parent_span_id"] == "")

        points = sorted(rnd.sample(range(1, tasks * 9 // 10), kills_at))
        deadline = time.monotonic() + 60 + tasks
        for point in points:
            while roots() < point:
                assert time.monotonic() < deadline, f"{roots()} of {tasks} traces received"
                await asyncio.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            kill_times.append(time.time())
            proc.wait()
            kills += 1
            proc = start_telemetry(bus.url, receiver.endpoint, durable, tmp_path, log)
            await wait_consumer(bus.js, durable, proc, log)
        await submitting
        for t in ids:
            state = await mesh.client.result(t, timeout=30)
            assert state.status is TaskStatus.COMPLETED, state.reason
        # What each trace is, from the ledger (a step run twice under load, redelivered,
        # has one more invoke_agent span than the plain fan-out).
        expected = {trace_id: {f"{s.context.span_id:016x}" for s in
                               build_spans(t, await mesh.client.events(t))}
                    for trace_id, t in traces.items()}
        assert all(len(v) >= SPANS_PER_FANOUT for v in expected.values())
        total = sum(len(v) for v in expected.values())
        # Every trace complete, then nothing more arrives: no late duplicates.
        await receiver.wait_for(
            lambda spans: sum(s["trace_id"] in traces for s in spans) >= total,
            timeout=30, what="every span")
        info = await bus.js.consumer_info(subjects.STREAM_LEDGER, durable)
        drain = time.monotonic() + 20
        while info.num_ack_pending or info.num_pending:
            assert time.monotonic() < drain, info
            await asyncio.sleep(0.1)
            info = await bus.js.consumer_info(subjects.STREAM_LEDGER, durable)
        spans = [s for s in receiver.spans() if s["trace_id"] in traces]
        counts = Counter((s["trace_id"], s["span_id"]) for s in spans)
        for trace_id, t in traces.items():  # nothing lost, nothing foreign
            got = {sid for (tr, sid) in counts if tr == trace_id}
            assert got == expected[trace_id], (t, len(got))
        # A second copy is the same span (ids and content): an id-keyed store holds one.
        copies: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for s in spans:
            copies.setdefault((s["trace_id"], s["span_id"]), []).append(s)
        twice = {k: v for k, v in copies.items() if len(v) > 1}
        for v in twice.values():
            first = {k: x for k, x in v[0].items() if k != "received"}
            assert all({k: x for k, x in c.items() if k != "received"} == first for c in v)
            assert len(v) <= kills + 1
        # ... and only a trace whose export was in flight at a kill is sent again: its
        # whole trace, first received within seconds of a kill, at most one request's
        # traces per kill (one in flight at two kills is sent three times).
        again = {tr for tr, _ in twice}
        for tr in again:
            assert sum(1 for (t2, _) in twice if t2 == tr) == len(expected[tr])
            first_seen = min(c["received"] for (t2, _), v in copies.items() if t2 == tr
                             for c in v)
            assert any(k - 5.0 <= first_seen <= k + 5.0 for k in kill_times), \
                (tr, first_seen, kill_times)
        resent = sum(max(len(v) for (t2, _), v in twice.items() if t2 == tr) - 1
                     for tr in again)
        assert resent <= kills * MAX_BATCH_TRACES, (resent, kills)
        stored = len(copies)  # what a store keyed by span id holds
        assert stored == total
        return {"tasks": tasks, "kills": kills, "spans_received": len(spans),
                "spans_stored_by_id": stored, "traces_sent_again": len(again), "resends": resent}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (subjects.STREAM_LEDGER, subjects.STREAM_LOG):
            try:
                await bus.js.delete_consumer(stream, durable)
            except Exception:
                pass


async def test_kill_9_telemetry_during_tasks_exports_each_span_once(
        make_mesh, receiver, bus, tmp_path: Path) -> None:
    got = await run_campaign(make_mesh, receiver, bus, tmp_path, tasks=20, kills_at=2,
                             seed=15)
    print("campaign:", got)
    assert got["kills"] == 2, got


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_kill_9_telemetry_during_100_tasks_exports_each_span_once(
        make_mesh, receiver, bus, tmp_path: Path) -> None:
    seed = int(os.environ.get("JETMESH_TELEMETRY_SEED", time.time()))
    got = await run_campaign(make_mesh, receiver, bus, tmp_path, tasks=100, kills_at=8,
                             seed=seed)
    print("campaign:", got, "seed:", seed)
    assert got["kills"] == 8, got
