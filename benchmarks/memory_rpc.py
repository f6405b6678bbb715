"""Memory service request/reply: the raw nats-py endpoint against a FastStream subscriber.

    .venv/bin/python benchmarks/memory_rpc.py -n 2000 --inflight 50 --rounds 3

Starts its own nats-server (`EmbeddedNats`), opens one memory store (embedded Qdrant in
a temporary folder, offline hashing embedder) and serves the same `MemoryService.handle`
two ways, one after the other, alternating for `--rounds`:

- **raw**: `MemoryService.start()` as deployed (one nats-py queue subscription on
  ``jm.memory.*``, a task per request under a semaphore, live span, reply-size check);
- **faststream**: a `NatsBroker` subscriber on the same subject and queue group
  (`max_workers` concurrent handlers) running the same span, `handle()` and size check
  and returning the reply bytes. The handler takes the message by annotation
  (``msg: NatsMessage``), the documented way;
- **fs-lean**: the same with a custom decoder that hands the message over as the body,
  so the handler needs no ``Context`` dependency (fast_depends runs that one, a sync
  callable, in a worker thread: one thread hop per request).

Each round sends `status` N times one after the other (sequential) and N times with
`--inflight` requests outstanding, through `MemoryClient` on a connection of its own.
Printed: round trips per second and process CPU per request (client and server share
the process, and the client side is the same in both, so the difference is the
server's).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from faststream.nats import NatsBroker, NatsMessage
from opentelemetry.trace import SpanKind

from jetmesh.bus import headers as hn
from jetmesh.bus import subjects, tracing
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.events import MAX_MESSAGE_BYTES
from jetmesh.bus.server import EmbeddedNats
from jetmesh.memory import MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService, error_reply


@asynccontextmanager
async def raw_endpoint(url: str, store: MemoryStore) -> AsyncIterator[None]:
    nc = await connect(url, name="bench-raw")
    service = MemoryService(nc, jetstream(nc), store, episodes=False)
    await service.start()
    try:
        yield
    finally:
        await service.stop()
        await nc.close()


@asynccontextmanager
async def faststream_endpoint(url: str, store: MemoryStore, workers: int, *, lean: bool = False
                              ) -> AsyncIterator[None]:
    nc = await connect(url, name="bench-fs-handler-conn")  # handle() needs no I/O of it
    service = MemoryService(nc, jetstream(nc), store, episodes=False)
    broker = NatsBroker(url, logger=None)

    async def on_request(msg: NatsMessage) -> bytes:
        op = msg.raw_message.subject.rsplit(".", 1)[-1]
        with tracing.live_span(f"memory {op}", parent=msg.headers.get(hn.TRACEPARENT),
                               kind=SpanKind.SERVER,
                               attributes={"jetmesh.memory.operation": op}):
            reply = await service.handle(op, msg.body)
        data = reply.model_dump_json(exclude_none=True).encode()
        if len(data) > MAX_MESSAGE_BYTES:
            data = error_reply("invalid_request", "too big").model_dump_json().encode()
        return data

    if lean:
        # The decoder hands the message itself to the handler as its body: an unannotated
        # parameter, so no `Context` dependency (fast_depends runs that one in a thread).
        async def as_message(msg: NatsMessage) -> NatsMessage:
            return msg

        async def lean_handler(msg):  # type: ignore[no-untyped-def]
            return await on_request(msg)

        broker.subscriber(subjects.MEMORY_ALL, queue=subjects.MEMORY_QUEUE,
                          max_workers=workers, decoder=as_message)(lean_handler)
    else:
        broker.subscriber(subjects.MEMORY_ALL, queue=subjects.MEMORY_QUEUE,
                          max_workers=workers)(on_request)
    await broker.start()
    try:
        yield
    finally:
        await broker.stop()
        await nc.close()


async def measure(client: MemoryClient, n: int, inflight: int) -> tuple[float, float]:
    """(round trips/s, CPU ms per request) of n status requests, `inflight` at a time."""
    sem = asyncio.Semaphore(inflight)

    async def one() -> None:
        async with sem:
            await client.status()

    cpu0, t0 = time.process_time(), time.perf_counter()
    if inflight == 1:
        for _ in range(n):
            await client.status()
    else:
        await asyncio.gather(*(one() for _ in range(n)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return n / wall, cpu / n * 1000


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedNats(data_dir=Path(tmp) / "nats").start()
        store = await MemoryStore.open(MemorySettings(
            data_dir=Path(tmp) / "mem", embedder="hash", hash_dims=64))
        try:
            nc = await connect(server.url, name="bench-client")
            client = MemoryClient(nc, timeout_s=30)
            results: dict[tuple[str, int], list[tuple[float, float]]] = {}

            async def run(name: str) -> None:
                ctx = (raw_endpoint(server.url, store) if name == "raw"
                       else faststream_endpoint(server.url, store, args.workers,
                                                lean=name == "fs-lean"))
                async with ctx:
                    await measure(client, 100, 1)  # warm up
                    for inflight in (1, args.inflight):
                        results.setdefault((name, inflight), []).append(
                            await measure(client, args.n, inflight))

            for _ in range(args.rounds):
                for name in ("raw", "faststream", "fs-lean"):
                    await run(name)
            await nc.close()
        finally:
            await store.close()
            server.stop()
    print(f"memory status request/reply, N={args.n}, median of {args.rounds} alternating rounds")
    print(f"{'endpoint':<11} {'in flight':>9} {'rt/s':>8} {'CPU ms/req':>11}")
    for (name, inflight), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        rate = statistics.median(r for r, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        print(f"{name:<11} {inflight:>9} {rate:>8.0f} {cpu:>11.3f}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--inflight", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=256,
                   help="FastStream max_workers (the raw service's max_requests is 256)")
    sys.exit(asyncio.run(main(p.parse_args())))
