"""Ledger throughput on a real nats-server: appends, fenced appends, read, follow.

    .venv/bin/python benchmarks/ledger.py                # 5000 events, median of 3 runs
    .venv/bin/python benchmarks/ledger.py --events 2000 --runs 1

Starts its own embedded nats-server (tmp data dir, `sync_interval: always`, exactly as
jetmesh ships it) and measures, through the public `Ledger` API:

- append, one at a time (awaiting each ack; validation on, as production does)
- append_many, pipelined in batches (`--batch`)
- fenced appends (`expected_last_subject_seq`, one subject, each on the previous seq)
- read of one task holding `--read-events` events (batched direct get)
- follow of the same task from seq 1 (ordered consumer)

and, for comparison, raw nats-py JetStream publishes of the same bytes (one at a time,
pipelined) on the same server, then the appends again on a second server WITHOUT
`sync_interval: always` (JetStream's default: fsync every two minutes), so the cost of
the fsync per acknowledged write is visible. Every figure is the median of `--runs`.
Progress goes to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from jetmesh.bus import events as ev
from jetmesh.bus import headers as hn
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger, subject_for
from jetmesh.bus.server import EmbeddedNats, find_nats_server
from jetmesh.bus.streams import declare_streams


def progress(msg: str) -> None:
    print(f"[ledger-bench] {msg}", file=sys.stderr, flush=True)


class EmbeddedNatsNoSync(EmbeddedNats):
    """The same server without `sync_interval: always` (JetStream's default fsync)."""

    def render_config(self) -> str:
        lines = [ln for ln in super().render_config().splitlines()
                 if "sync_interval" not in ln]
        return "\n".join(lines) + "\n"


def model_called(task_id: str, step_id: str = "s1") -> ev.ModelCalled:
    """A realistic ledger event (a worker's model call, ~600 bytes encoded)."""
    return ev.ModelCalled(
        subject=task_id, source="jetmesh/agent/support",
        data=ev.ModelCalledData(
            step_id=step_id, agent="support", purpose="step", provider="sim",
            model="dry-run", input_tokens=412, output_tokens=37, cost_usd=0.0,
            latency_ms=0.1,
            response={"provider": "sim", "model": "dry-run", "text": "",
                      "tool_calls": [{"id": "sim_1", "name": "lookup_order",
                                      "arguments": {"order_id": "A1003"}}],
                      "usage": {"input_tokens": 412, "output_tokens": 37},
                      "stop_reason": "tool_use", "raw": {}}))


def events_for(n: int, *, one_task: bool) -> list[ev.ModelCalled]:
    """`n` events: all on one task (for read/follow) or each on its own task."""
    if one_task:
        tid = uuid.uuid4().hex
        return [model_called(tid) for _ in range(n)]
    return [model_called(uuid.uuid4().hex) for _ in range(n)]


# --------------------------------------------------------------------------- measures


async def m_append(ledger: Ledger, n: int, batch: int) -> float:
    evs = events_for(n, one_task=False)
    t0 = time.perf_counter()
    for e in evs:
        await ledger.append(e)
    return n / (time.perf_counter() - t0)


async def m_append_many(ledger: Ledger, n: int, batch: int) -> float:
    evs = events_for(n, one_task=False)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        await ledger.append_many(evs[i:i + batch])
    return n / (time.perf_counter() - t0)


async def m_fenced(ledger: Ledger, n: int, batch: int) -> float:
    tid = uuid.uuid4().hex
    evs = [model_called(tid) for _ in range(n)]
    last = 0
    t0 = time.perf_counter()
    for e in evs:
        last = await ledger.append(e, expected_last_subject_seq=last)
    return n / (time.perf_counter() - t0)


def raw_payloads(n: int) -> list[tuple[str, bytes, dict[str, str]]]:
    """The same bytes and headers a ledger append would send, prepared in advance."""
    out = []
    for e in events_for(n, one_task=False):
        out.append((subject_for(e), ev.encode_event(e),
                    {hn.MSG_ID: e.id, hn.CE_TYPE: e.type}))
    return out


async def m_raw_one(ledger: Ledger, n: int, batch: int) -> float:
    msgs = raw_payloads(n)
    js = ledger.js
    t0 = time.perf_counter()
    for subj, data, hdrs in msgs:
        await js.publish(subj, data, headers=hdrs)
    return n / (time.perf_counter() - t0)


async def m_raw_pipelined(ledger: Ledger, n: int, batch: int) -> float:
    msgs = raw_payloads(n)
    js = ledger.js
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        futs = [await js.publish_async(s, d, headers=h) for s, d, h in msgs[i:i + batch]]
        await asyncio.gather(*futs)
    return n / (time.perf_counter() - t0)


async def fill_task(ledger: Ledger, n: int) -> str:
    evs = events_for(n, one_task=True)
    for i in range(0, n, 500):
        await ledger.append_many(evs[i:i + 500], validate=False)
    return evs[0].subject


async def m_read(ledger: Ledger, tid: str, n: int) -> float:
    t0 = time.perf_counter()
    got = await ledger.read(tid)
    dt = time.perf_counter() - t0
    assert len(got) == n, (len(got), n)
    return n / dt


async def m_follow(ledger: Ledger, tid: str, n: int) -> float:
    t0 = time.perf_counter()
    count = 0
    agen = ledger.follow(tid, from_seq=1)
    try:
        async for _ in agen:
            count += 1
            if count >= n:
                break
    finally:
        await agen.aclose()
    dt = time.perf_counter() - t0
    return n / dt


# --------------------------------------------------------------------------- driver

Measure = Callable[[Ledger, int, int], Awaitable[float]]

APPEND_MEASURES: list[tuple[str, Measure]] = [
    ("ledger append, one at a time", m_append),
    ("ledger append_many, pipelined", m_append_many),
    ("ledger fenced append (expected seq)", m_fenced),
    ("raw nats-py js.publish, one at a time", m_raw_one),
    ("raw nats-py js.publish_async, pipelined", m_raw_pipelined),
]


async def bench_server(label: str, server: EmbeddedNats, args: argparse.Namespace,
                       with_reads: bool) -> dict[str, float]:
    nc = await connect(server.url, name="ledger-bench")
    try:
        js = jetstream(nc)
        await declare_streams(js)
        ledger = Ledger(nc, js, timeout_s=30.0)
        # Warm up: connection, stream files, pydantic validators.
        await m_append(ledger, 200, args.batch)
        await m_append_many(ledger, 200, args.batch)
        results: dict[str, float] = {}
        for name, fn in APPEND_MEASURES:
            runs = []
            for r in range(args.runs):
                v = await fn(ledger, args.events, args.batch)
                runs.append(v)
                progress(f"{label}: {name}: run {r + 1}/{args.runs}: {v:,.0f}/s")
            results[name] = statistics.median(runs)
        if with_reads:
            n = args.read_events
            progress(f"{label}: filling one task with {n} events for read/follow")
            reads, follows = [], []
            for r in range(args.runs):
                tid = await fill_task(ledger, n)
                v = await m_read(ledger, tid, n)
                reads.append(v)
                progress(f"{label}: read {n} events: run {r + 1}/{args.runs}: {v:,.0f} ev/s")
                v = await m_follow(ledger, tid, n)
                follows.append(v)
                progress(f"{label}: follow {n} events: run {r + 1}/{args.runs}: {v:,.0f} ev/s")
            results[f"ledger read of a {n}-event task (events/s)"] = statistics.median(reads)
            results[f"ledger follow from seq 1 over {n} events (events/s)"] = (
                statistics.median(follows))
        return results
    finally:
        await nc.close()


def versions() -> dict[str, str]:
    try:
        nats_v = subprocess.run([find_nats_server(), "--version"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception as e:
        nats_v = f"? ({e})"
    return {
        "cores (os.cpu_count)": str(os.cpu_count()),
        "python": sys.version.split()[0],
        "nats-server": nats_v,
        "nats-py": importlib.metadata.version("nats-py"),
        "pydantic": importlib.metadata.version("pydantic"),
        "jetmesh": importlib.metadata.version("jetmesh"),
    }


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="jetmesh-ledger-bench-"))
    servers: list[EmbeddedNats] = []
    try:
        sync = EmbeddedNats(data_dir=tmp / "sync", server_name="bench-sync")
        servers.append(sync)
        sync.start()
        progress(f"server with sync_interval: always at {sync.url}")
        res_sync = await bench_server("sync=always", sync, args, with_reads=True)
        sync.stop()

        nosync = EmbeddedNatsNoSync(data_dir=tmp / "nosync", server_name="bench-nosync")
        servers.append(nosync)
        nosync.start()
        progress(f"server with default sync (2 min) at {nosync.url}")
        res_nosync = await bench_server("sync=default", nosync, args, with_reads=False)
        nosync.stop()
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("jetmesh ledger benchmark")
    for k, v in versions().items():
        print(f"  {k:<22} {v}")
    print(f"  events per run         {args.events} (pipelined batch {args.batch}); "
          f"median of {args.runs} run(s)")
    print(f"  event size             {len(ev.encode_event(model_called('x' * 32)))} bytes "
          "(ModelCalled, JSON CloudEvent)")
    print()
    w = max(len(k) for k in res_sync) + 2
    print(f"{'measure':<{w}} {'sync=always':>14} {'sync=default':>14} {'fsync cost':>11}")
    print("-" * (w + 42))
    for k, v in res_sync.items():
        other = res_nosync.get(k)
        if other is not None:
            cost = f"{other / v:>10.2f}x"
            print(f"{k:<{w}} {v:>12,.0f}/s {other:>12,.0f}/s {cost}")
        else:
            print(f"{k:<{w}} {v:>12,.0f}/s {'-':>14} {'':>11}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=5000, help="events per append measure")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    p.add_argument("--batch", type=int, default=256, help="pipelined batch size")
    p.add_argument("--read-events", type=int, default=10_000,
                   help="events in the task that is read and followed")
    args = p.parse_args()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
