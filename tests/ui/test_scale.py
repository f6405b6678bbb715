"""The task list at size: projected once into KV, answered from the live mirror.

Default run: 1,000 tasks (a smoke); `-m slow`: 10,000 tasks, the list must answer in
under 300 ms. Each task is a real submitted + completed pair of ledger events on a
server of the test's own. Prints the figures (the note quotes them)."""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from jetmesh.a2a.ui import DashboardSettings, mount
from jetmesh.agents.registry import Registry
from jetmesh.bus import events as ev
from jetmesh.bus.server import EmbeddedNats, free_port
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.tasks_kv import read_summaries

TOKEN = "tok-scale"


async def fill(client: Client, n: int) -> list[str]:
    ids: list[str] = []
    batch: list[ev.Event] = []
    for i in range(n):
        tid = f"scale-{i:06d}"
        ids.append(tid)
        batch += [
            ev.TaskSubmitted(subject=tid, data=ev.TaskSubmittedData(
                goal=f"task {i}", workflow="wf-even" if i % 2 == 0 else "wf-odd",
                user_id=f"user{i % 7}")),
            ev.TaskCompleted(subject=tid, data=ev.TaskCompletedData(result={"i": i}))
            if i % 10 else ev.TaskFailed(subject=tid, data=ev.TaskFailedData(
                code="error", reason="ten percent fail"))]
        if len(batch) >= 500:
            await client.ledger.append_many(batch)
            batch = []
    if batch:
        await client.ledger.append_many(batch)
    return ids


async def run_scale(tmp_path: Path, n: int, budget_ms: float) -> None:
    server = EmbeddedNats(data_dir=tmp_path / "nats")
    server.start()
    client = Client(server.url)
    try:
        await client.connect()
        t0 = time.perf_counter()
        await fill(client, n)
        filled = time.perf_counter() - t0
        registry = await Registry.open(client.js)
        dash_mount = mount(client, registry, DashboardSettings(
            data_dir=tmp_path, tokens=f"ops:read-only:{TOKEN}"))
        dash = dash_mount.app.state.dashboard  # type: ignore[attr-defined]
        port = free_port()
        web = uvicorn.Server(uvicorn.Config(Starlette(routes=[dash_mount]), port=port,
                                            log_level="warning", lifespan="off"))
        serving = asyncio.create_task(web.serve())
        while not web.started:  # noqa: ASYNC110 (uvicorn has no started event)
            await asyncio.sleep(0.02)
        try:
            t1 = time.perf_counter()
            await dash.start()
            assert dash.projector is not None and dash.index is not None
            await dash.projector.wait_caught_up(120)
            projected = time.perf_counter() - t1
            await dash.index.wait_loaded(60)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/ui") as h:
                assert (await h.post("/api/login", json={"token": TOKEN})).status_code == 200
                first = (await h.get("/api/tasks")).json()  # waits for the mirror
                assert first["all"] == n, first["all"]
                times: list[float] = []
                for params in ({}, {"state": "failed"}, {"workflow": "wf-odd"},
                               {"user": "user3"}, {"q": "scale-00042"}) * 6:
                    t = time.perf_counter()
                    r = await h.get("/api/tasks", params=params)
                    times.append((time.perf_counter() - t) * 1000)
                    assert r.status_code == 200
                body = r.json()
                assert body["counts"] == {"completed": n - n // 10, "failed": n // 10}
                assert {t["task_id"] for t in body["tasks"]} == {
                    f"scale-{i:06d}" for i in range(420, 430)}
                failed = (await h.get("/api/tasks", params={"state": "failed"})).json()
                assert failed["total"] == n // 10
            t2 = time.perf_counter()
            rows = await read_summaries(client.js)
            kv_read = time.perf_counter() - t2
            assert len(rows) == n
            p50, p95 = statistics.median(times), sorted(times)[int(len(times) * 0.95)]
            print(f"\n{n} tasks: ledger filled in {filled:.1f}s, projected into KV in "
                  f"{projected:.1f}s ({2 * n / projected:.0f} events/s); task list "
                  f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, max {max(times):.1f} ms over "
                  f"{len(times)} requests; all {n} summaries read from KV in "
                  f"{kv_read * 1000:.0f} ms")
            assert p95 < budget_ms, times
        finally:
            web.should_exit = True
            await serving
            await dash.stop()
            await registry.close()
    finally:
        await client.close()
        server.stop()


async def test_task_list_at_1000_tasks(tmp_path: Path) -> None:
    await run_scale(tmp_path, 1000, 300)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_task_list_at_10000_tasks_under_300_ms(tmp_path: Path) -> None:
    await run_scale(tmp_path, 10_000, 300)
