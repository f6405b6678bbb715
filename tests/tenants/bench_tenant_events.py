"""How a tenant account reads its tasks' events (bus.tenancy), measured on a real
nats-server run with `nats-config --tenants`'s accounts (not a test: run it by hand).

    .venv/bin/python tests/tenants/bench_tenant_events.py [--events 2000] [--tasks 20]

- live: an event appended to the ledger (as the orchestrator appends) until it arrives
  (a) at a tenant account's subscription through the relay (TenantService) and (b) at
  an ordered consumer in the mesh account (what a tenant would get if it could read the
  ledger itself): per-event latency, p50 / p99, and the relay's events per second.
- read: one task's events (its ledger of ~20 events) by `jm.tasks.get` through the
  tenant's service import, against Ledger.read in the mesh account: round trips per s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import nats

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import Ledger
from jetmesh.bus.permissions import AuthConfig
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams
from jetmesh.bus.tenancy import SEQ_HEADER, TenantService, tenant_user

TENANT = "acme"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(n_events: int, n_tasks: int) -> None:
    auth = AuthConfig.create({}, tenants=[TENANT])
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedNats(data_dir=Path(d), extra_config=auth.server_config()).start()
        try:
            await run(server, auth, n_events, n_tasks)
        finally:
            server.stop()


async def run(server: EmbeddedNats, auth: AuthConfig, n_events: int, n_tasks: int) -> None:
    pw = auth.passwords
    admin = await connect(server.url, user="admin", password=pw["admin"],
                          inbox_prefix=auth.user("admin").inbox_prefix)
    js = jetstream(admin)
    await declare_streams(js)
    ledger = Ledger(admin, js)
    ten = await connect(server.url, user="tenants", password=pw["tenants"],
                        inbox_prefix=auth.user("tenants").inbox_prefix)
    service = TenantService(ten, jetstream(ten))
    await service.start()
    tenant = await nats.connect(server.url, user=tenant_user(TENANT),
                                password=pw[tenant_user(TENANT)])
    tasks = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(n_tasks)]
    for t in tasks:
        await ledger.append(ev.TaskSubmitted(subject=t, source="bench",
                                             data=ev.TaskSubmittedData(tenant=TENANT)))
    got_tenant: dict[int, float] = {}
    got_mesh: dict[int, float] = {}
    done_tenant, done_mesh = asyncio.Event(), asyncio.Event()
    want: set[int] = set()

    async def on_tenant(msg: nats.aio.msg.Msg) -> None:
        got_tenant[int(msg.headers[SEQ_HEADER])] = time.perf_counter()
        if want and want <= got_tenant.keys():
            done_tenant.set()

    await tenant.subscribe(f"{subjects.PREFIX}.task.>", cb=on_tenant)
    await tenant.flush()
    start_seq = (await js.stream_info(subjects.STREAM_LEDGER)).state.last_seq + 1

    async def mesh_follow() -> None:
        async for entry in ledger.follow(from_seq=start_seq):
            got_mesh[entry.seq] = time.perf_counter()
            if want and want <= got_mesh.keys():
                done_mesh.set()

    follower = asyncio.create_task(mesh_follow())
    sent: dict[int, float] = {}
    t0 = time.perf_counter()
    for i in range(n_events):
        t = tasks[i % n_tasks]
        at = time.perf_counter()
        seq = await ledger.append(ev.CancelRequested(
            subject=t, source="bench", data=ev.CancelRequestedData(by="bench")))
        sent[int(getattr(seq, "seq", seq))] = at
    want.update(sent)
    if want <= got_tenant.keys():
        done_tenant.set()
    if want <= got_mesh.keys():
        done_mesh.set()
    await asyncio.wait_for(asyncio.gather(done_tenant.wait(), done_mesh.wait()), 120)
    span = max(got_tenant[s] for s in sent) - t0
    lat_t = [(got_tenant[s] - sent[s]) * 1000 for s in sent]
    lat_m = [(got_mesh[s] - sent[s]) * 1000 for s in sent]
    print(f"live, {n_events} events over {n_tasks} tasks, sequential appends:")
    print(f"  tenant account via relay: p50 {statistics.median(lat_t):.2f} ms, "
          f"p99 {pct(lat_t, 0.99):.2f} ms; {n_events / span:.0f} events/s end to end")
    print(f"  mesh ordered consumer:    p50 {statistics.median(lat_m):.2f} ms, "
          f"p99 {pct(lat_m, 0.99):.2f} ms")
    # A burst: pipelined appends, until the tenant has every copy (the relay's ceiling).
    done_tenant.clear()
    done_mesh.clear()
    want.clear()
    burst = [ev.CancelRequested(subject=tasks[i % n_tasks], source="bench",
                                data=ev.CancelRequestedData(by="bench"))
             for i in range(n_events)]
    t2 = time.perf_counter()
    seqs = await ledger.append_many(burst)
    want.update(seqs)
    if want <= got_tenant.keys():
        done_tenant.set()
    if want <= got_mesh.keys():
        done_mesh.set()
    await done_mesh.wait()
    mesh_s = max(got_mesh[s] for s in seqs) - t2
    await asyncio.wait_for(done_tenant.wait(), 120)
    tenant_s = max(got_tenant[s] for s in seqs) - t2
    print(f"burst of {n_events} pipelined appends: the mesh consumer had them all after "
          f"{mesh_s:.2f} s, the tenant account after {tenant_s:.2f} s "
          f"({n_events / tenant_s:.0f} events/s through the relay)")
    follower.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await follower
    # Reads of one task (its submission + n_events / n_tasks events).
    task = tasks[0]
    body = f'{{"task_id": "{task}"}}'.encode()
    rounds = 200
    for label, call in (
            ("jm.tasks.get via the tenant's import", lambda: tenant.request(
                f"{subjects.TASK_OPS}.get", body, timeout=10)),
            ("Ledger.read in the mesh account", lambda: ledger.read(task))):
        for _ in range(20):
            await call()
        t1 = time.perf_counter()
        for _ in range(rounds):
            await call()
        dt = time.perf_counter() - t1
        print(f"read of a {1 + n_events // n_tasks}-event task, {label}: "
              f"{rounds / dt:.0f} reads/s ({dt / rounds * 1000:.2f} ms each)")
    await service.stop()
    for nc in (tenant, ten, admin):
        await nc.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--tasks", type=int, default=20)
    a = p.parse_args()
    asyncio.run(main(a.events, a.tasks))
