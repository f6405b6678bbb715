"""Budgets over time: a tenant's daily cap across many concurrent tasks is never exceeded
and its alert fires once (event and webhook); user caps; refusals release what they took;
the alert metric (jetmesh.spend.alerts) by tenant and by user."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from tenant_helpers import send_tenant_step

from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest
from jetmesh.agents.spec import AgentSpec, ModelPolicy, SkillSpec
from jetmesh.agents.tools import tool
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.budgets import BudgetRefused
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.ledger import LedgerEntry
from jetmesh.bus.spendcaps import (
    ALERTS_METRIC,
    Cap,
    SpendBook,
    SpendCaps,
    spend_key,
    who_token,
)
from jetmesh.orchestrator.audit import build_audit
from jetmesh.orchestrator.stats import aggregate, task_summary


@tool(name="tick")
def tick(n: int) -> dict[str, int]:
    """A quick read-only tool."""
    return {"n": n}


SPEC = AgentSpec(name="spender", description="spends a little per step",
                 skills=[SkillSpec(id="spend", name="spend", description="spend")],
                 tools=[tick], model=ModelPolicy(max_tokens=40))


def two_calls(request: ModelRequest) -> Any:
    if not any(m.role == "tool" for m in request.messages):
        return tool_call("tick", n=1)
    return "spent"


class Webhook:
    """A local HTTP endpoint that keeps every POSTed body."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.got = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        self.bodies.append(json.loads(await reader.readexactly(length)))
        self.got.set()
        writer.write(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> Webhook:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/alerts"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


async def run_steps(bus: Any, tenant: str, n: int, wait_s: float = 110
                    ) -> dict[str, ev.Event]:
    """Send one step per task for `tenant`, return each task's terminal step event."""
    tasks = [ev.new_id() for _ in range(n)]
    ends: dict[str, ev.Event] = {}
    all_in = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        e = ev.decode_event(msg.data)
        if isinstance(e, ev.StepCompleted | ev.StepFailed) and e.subject in wanted:
            ends.setdefault(e.subject, e)
            if len(ends) == n:
                all_in.set()

    wanted = set(tasks)
    sub = await bus.nc.subscribe(subjects.ALL_STEP_EVENTS, cb=on_msg)  # before sending
    try:
        gate = asyncio.Semaphore(64)  # all in flight, sent 64 at a time

        async def one(t: str) -> None:
            async with gate:
                await send_tenant_step(bus.ledger, ev.StepCommand(
                    task_id=t, step_id="s1", skill="spend", input={}, tenant=tenant))

        await asyncio.gather(*(one(t) for t in tasks))
        await asyncio.wait_for(all_in.wait(), wait_s)
    finally:
        await sub.unsubscribe()
    return ends


@pytest.mark.parametrize("n", [100, pytest.param(1000, marks=[pytest.mark.slow,
                                                             pytest.mark.timeout(900)])])
async def test_a_tenants_daily_cap_holds_under_concurrency_and_alerts_once(
        bus, n: int) -> None:
    tenant = f"t-cap-{ev.new_id()[:8]}"
    caps = SpendCaps(alert_share=0.5)
    conns = [await connect(bus.url) for _ in range(2)]
    workers = [Worker(SPEC, FunctionModel(two_calls, name="spender"), nc, jetstream(nc),
                      replica=f"sp{i}", spend_caps=caps) for i, nc in enumerate(conns)]
    for w in workers:
        await w.start()
    try:
        async with Webhook() as hook:
            # Calibrate: what one task costs (no cap for this tenant yet).
            probe = await run_steps(bus, f"{tenant}-probe", 1)
            (probe_id,) = probe
            per_task = sum(e.event.data.cost_usd for e in await bus.ledger.read(probe_id)
                           if isinstance(e.event, ev.ModelCalled))
            assert per_task > 0
            cap = per_task * n / 2  # half of what the tasks would spend
            caps.tenants[tenant] = Cap(daily_usd=cap)
            caps.webhook_url = hook.url
            ends = await run_steps(bus, tenant, n, wait_s=110 if n <= 100 else 840)
            entries = {t: await bus.ledger.read(t) for t in ends}
            spent = sum(e.event.data.cost_usd for es in entries.values() for e in es
                        if isinstance(e.event, ev.ModelCalled))
            counter = await workers[0].spend.counter(          # type: ignore[union-attr]
                spend_key("tenant", tenant, "day", datetime.now(UTC)))
            completed = [t for t, e in ends.items() if isinstance(e, ev.StepCompleted)]
            refused = [t for t, e in ends.items() if isinstance(e, ev.StepFailed)]
            print(f"\n{n} tasks, cap ${cap:.6f}: spent ${spent:.6f} ({spent / cap:.1%}), "
                  f"{len(completed)} completed, {len(refused)} refused")
            codes = sorted({(e.data.code, e.data.reason[:80]) for e in ends.values()
                            if isinstance(e, ev.StepFailed)})
            assert all(c == "budget_exceeded" for c, _ in codes), codes
            # Never exceeded; the counter is exactly what the ledger says was spent.
            assert spent <= cap + 1e-12
            assert counter.spent_usd == pytest.approx(spent, abs=1e-12)
            assert counter.reserved == {}
            assert completed and refused
            assert all(e.data.code == "budget_exceeded" for e in ends.values()
                       if isinstance(e, ev.StepFailed))
            exceeded = [e.event for es in entries.values() for e in es
                        if isinstance(e.event, ev.BudgetExceeded)]
            assert exceeded and all("tenant" in x.data.kind and x.data.limit == cap
                                    and x.data.would_be > cap for x in exceeded)
            # The alert: once, as an event and through the webhook.
            alerts = [e.event for es in entries.values() for e in es
                      if isinstance(e.event, ev.BudgetAlerted)]
            assert len(alerts) == 1, alerts
            a = alerts[0].data
            assert (a.scope, a.who, a.period, a.cap_usd, a.share) == ("tenant", tenant, "day",
                                                                      cap, 0.5)
            assert a.spent_usd >= 0.5 * cap
            await asyncio.wait_for(hook.got.wait(), 10)
            assert len(hook.bodies) == 1 and hook.bodies[0]["key"] == a.key
            assert counter.alerted
            # The audit export of the task that crossed shows the alert.
            audit = build_audit(alerts[0].subject, entries[alerts[0].subject])
            assert [(x.who, x.cap_usd) for x in audit.budget_alerts] == [(tenant, cap)]
    finally:
        for w in workers:
            await w.stop()
        for nc in conns:
            await nc.close()


def alert_counts(reader: InMemoryMetricReader) -> dict[tuple[tuple[str, Any], ...], int]:
    """`jetmesh.spend.alerts` by attributes, from what the reader collected."""
    out: dict[tuple[tuple[str, Any], ...], int] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == ALERTS_METRIC:
                    for p in m.data.data_points:
                        out[tuple(sorted(p.attributes.items()))] = int(p.value)
    return out


async def test_user_caps_and_a_refusal_releases_every_reservation(bus) -> None:
    tenant, user = f"t-u-{ev.new_id()[:8]}", f"ann-{ev.new_id()[:8]}@example.com"
    caps = SpendCaps(tenants={tenant: Cap(daily_usd=1.0, monthly_usd=5.0)},
                     users={user: Cap(monthly_usd=0.25)})
    reader = InMemoryMetricReader()
    book = SpendBook(bus.js, caps, meter=MeterProvider(metric_readers=[reader]).get_meter("t"))
    now = datetime.now(UTC)
    keys = [k for k, *_ in caps.counters(tenant, user, now)]
    assert [k.split(".")[0] for k in keys] == ["tenant", "tenant", "user"]
    assert "@" not in keys[2]  # a user id that is not a token is hashed into the key
    r1 = await book.reserve(tenant, user, 0.2)
    assert r1 is not None
    with pytest.raises(BudgetRefused) as refused:
        await book.reserve(tenant, user, 0.1)  # the user's monthly cap (0.3 > 0.25)
    assert "user" in refused.value.kind and "monthly" in refused.value.kind
    # The refused call's tenant reservations were released: only r1's remain.
    for k in keys:
        assert list((await book.counter(k)).reserved) == [r1.id]
    assert await book.settle(r1, 0.15) == []  # below every alert share (0.8)
    r2 = await book.reserve(tenant, user, 0.1)
    assert r2 is not None
    assert alert_counts(reader) == {}
    alerts = await book.settle(r2, 0.06)  # the user's spend: 0.21 >= 0.8 * 0.25
    assert [(x.scope, x.period) for x in alerts] == [("user", "month")]
    # The metric beside the event and the webhook: the user's key token, not the e-mail.
    assert alert_counts(reader) == {(("jetmesh.spend.period", "month"),
                                     ("jetmesh.spend.scope", "user"),
                                     ("jetmesh.user", who_token(user))): 1}
    r3 = await book.reserve(tenant, None, 0.7)  # the tenant's day: 0.21 + 0.7 >= 0.8
    assert r3 is not None
    assert [(x.scope, x.period) for x in await book.settle(r3, 0.7)] == [("tenant", "day")]
    assert alert_counts(reader)[(("jetmesh.spend.period", "day"),
                                 ("jetmesh.spend.scope", "tenant"),
                                 ("jetmesh.tenant", tenant))] == 1
    assert await book.reserve(f"{tenant}-other", None, 10.0) is None  # no cap applies


def test_the_stats_projection_counts_spend_alerts_by_tenant() -> None:
    """`jetmesh stats --by tenant`: a task's record counts its BudgetAlerted events."""
    def task(task_id: str, tenant: str, alerts: int) -> list[LedgerEntry]:
        events: list[ev.Event] = [ev.TaskSubmitted(subject=task_id, source="t",
                                                   data=ev.TaskSubmittedData(tenant=tenant))]
        events += [ev.BudgetAlerted(subject=task_id, source="t", data=ev.BudgetAlertedData(
            agent="a", scope="tenant", who=tenant, period=period, key=f"tenant.{tenant}.x",
            cap_usd=1.0, share=0.8, spent_usd=0.8)) for period in ("day", "month")[:alerts]]
        events.append(ev.TaskCompleted(subject=task_id, source="t",
                                       data=ev.TaskCompletedData(result={})))
        return [LedgerEntry(i + 1, subjects.task_events(task_id), e)
                for i, e in enumerate(events)]

    records = [task_summary(t, task(t, tenant, n)) for t, tenant, n in
               (("s1", "acme", 2), ("s2", "acme", 0), ("s3", "globex", 1))]
    assert [r["spend_alerts"] for r in records if r] == [2, 0, 1]
    figures = aggregate([r for r in records if r], by="tenant")
    assert figures["all"]["spend_alerts"] == 3
    assert {k: v["spend_alerts"] for k, v in figures["by_tenant"].items()} == {
        "acme": 2, "globex": 1}
