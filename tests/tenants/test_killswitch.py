"""The kill switch: 4 replicas calling a tool nonstop; `disable` stops every call within
1 s (measured), each refusal is a policy decision, `enable` resumes them."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import pytest
from helpers import record_dispatch, send_step, wait_for_entry
from tenant_helpers import send_tenant_step
from typer.testing import CliRunner

from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest
from jetmesh.agents.spec import AgentSpec, Limits, SkillSpec
from jetmesh.agents.tools import ToolContext, tool
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.killswitch import (
    KillRule,
    KillSwitchBoard,
    KillSwitchWatch,
    StaticKillSwitch,
    blocking_rule,
)
from jetmesh.bus.permissions import AuthConfig

REPLICAS = 4


class Calls:
    """What really ran (per replica, monotonic times) and what the models were told."""

    def __init__(self) -> None:
        self.ran: dict[str, list[float]] = defaultdict(list)
        self.refused: dict[str, list[float]] = defaultdict(list)
        self.stop = False
        self.grew = asyncio.Event()


def make_spec(calls: Calls) -> AgentSpec:
    @tool(name="ping")
    async def ping(n: int, ctx: ToolContext) -> dict[str, Any]:
        """Ping (a tool doing a little work)."""
        calls.ran[ctx.worker or "?"].append(time.monotonic())
        calls.grew.set()
        await asyncio.sleep(0.01)  # the tool's own work, not a wait for an event
        return {"pong": n}

    return AgentSpec(
        name="ks-agent", description="calls ping until told to stop",
        skills=[SkillSpec(id="ks_ping", name="ping", description="ping loop", tools=["ping"])],
        tools=[ping], limits=Limits(max_tool_calls=100_000, max_turns=100_000))


def model_for(replica: str, calls: Calls) -> FunctionModel:
    def turn(request: ModelRequest) -> Any:
        last = request.messages[-1]
        if last.role == "tool" and "denied by policy" in last.content:
            calls.refused[replica].append(time.monotonic())
            calls.grew.set()
            return "stopped: the tool is disabled"
        if calls.stop:
            return "done"
        return tool_call("ping", n=len(request.messages))

    return FunctionModel(turn, name=f"ks-{replica}")


async def wait_until(calls: Calls, pred: Any, timeout: float = 30.0) -> None:
    async def loop() -> None:
        while not pred():
            calls.grew.clear()
            await calls.grew.wait()
    await asyncio.wait_for(loop(), timeout)


def test_rules_match_tools_agents_servers_and_tenants() -> None:
    tool_rule = KillRule(kind="tool", name="refund")
    server = KillRule(kind="server", name="crm", tenant="acme")
    agent = KillRule(kind="agent", name="support", agent=None)
    only_a = KillRule(kind="tool", name="lookup", agent="orders")
    assert blocking_rule([tool_rule], "refund", "support", None) == tool_rule
    assert blocking_rule([tool_rule], "refunds", "support", None) is None
    assert blocking_rule([server], "crm__update", "x", "acme") == server
    assert blocking_rule([server], "crm__update", "x", "other") is None
    assert blocking_rule([server], "crmx__update", "x", "acme") is None
    assert blocking_rule([agent], "anything", "support", None) == agent
    assert blocking_rule([agent], None, "support", None) == agent  # its model calls too
    assert blocking_rule([agent], "anything", "orders", None) is None
    assert blocking_rule([only_a], "lookup", "orders", None) == only_a
    assert blocking_rule([only_a], "lookup", "support", None) is None
    assert StaticKillSwitch([tool_rule]).check("refund", "a", "t") == tool_rule
    # Keys are distinct per scope, and the "any" token can never be a real name.
    keys = {r.key for r in (tool_rule, server, agent, only_a,
                            KillRule(kind="tool", name="refund", tenant="acme"))}
    assert len(keys) == 5 and "tool.refund.=.=" in keys
    with pytest.raises(ValueError):
        KillRule(kind="tool", name="a.b")


def test_only_the_admin_may_write_rules_and_every_worker_may_read_them() -> None:
    auth = AuthConfig.create({"ks-agent": ["ks_ping"]})
    put = subjects.kv_subject(subjects.BUCKET_KILLSWITCH, "tool.ping.=.=")
    get = f"{subjects.JS_API}.DIRECT.GET.{subjects.kv_stream(subjects.BUCKET_KILLSWITCH)}." + put
    writers = {u.user for u in auth.users if u.permissions.may_publish(put)}
    assert writers == {"admin"}
    readers = {u.user for u in auth.users if u.permissions.may_publish(get)}
    assert {"agent-ks-agent", "bridge"} <= readers


def test_cli_disable_list_enable(nats_server: Any) -> None:
    from jetmesh.orchestrator.cli import app

    runner = CliRunner()
    url = ["--url", nats_server.url]
    out = runner.invoke(app, ["tools", "disable", "update", "--server", "crm", "--tenant",
                              "acme", "--reason", "incident 42", *url])
    assert out.exit_code == 0, out.output
    assert "tool.crm__update.=.acme" in out.output
    out = runner.invoke(app, ["tools", "disable", "--agent", "support", *url])
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["tools", "list", "--json", *url])
    assert out.exit_code == 0, out.output
    assert '"crm__update"' in out.output and '"incident 42"' in out.output
    assert '"kind": "agent"' in out.output
    for args in (["update", "--server", "crm", "--tenant", "acme"], ["--agent", "support"]):
        out = runner.invoke(app, ["tools", "enable", *args, *url])
        assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["tools", "enable", "--agent", "support", *url])
    assert out.exit_code == 1
    out = runner.invoke(app, ["tools", "disable", *url])
    assert out.exit_code != 0


async def test_disable_stops_every_replica_within_a_second_and_enable_resumes(bus) -> None:
    calls = Calls()
    spec = make_spec(calls)
    conns = [await connect(bus.url) for _ in range(REPLICAS)]
    # One step at a time per replica: 4 never-ending steps occupy all 4 replicas.
    workers = [Worker(spec, model_for(f"ks{i}", calls), nc, jetstream(nc),
                      replica=f"ks{i}", concurrency=1) for i, nc in enumerate(conns)]
    board = KillSwitchBoard(bus.js)
    await board.enable("tool", "ping")  # a leftover of an earlier run of this test
    watch = KillSwitchWatch(bus.js)
    await watch.start()
    for w in workers:
        await w.start()
    task_id = ev.new_id()
    steps = [f"s{i}" for i in range(REPLICAS)]
    try:
        for s in steps:
            await send_step(bus.ledger, ev.StepCommand(task_id=task_id, step_id=s,
                                                       skill="ks_ping", input={}))
        replicas = {f"ks{i}" for i in range(REPLICAS)}
        await wait_until(calls, lambda: {r for r, ts in calls.ran.items()
                                         if len(ts) >= 3} == replicas)
        t0 = time.monotonic()
        await board.disable(KillRule(kind="tool", name="ping", reason="incident",
                                     by="test"))
        await wait_until(calls, lambda: set(calls.refused) == replicas, timeout=10)
        # Every replica's first refused call, and its last call that really ran.
        first_refusal = {r: min(t for t in ts if t >= t0) - t0
                         for r, ts in calls.refused.items()}
        last_ran = {r: max(ts) - t0 for r, ts in calls.ran.items()}
        print("\nkill switch: first refusal per replica after disable (s): "
              + ", ".join(f"{r}={v:.3f}" for r, v in sorted(first_refusal.items()))
              + "; last call that ran (s): "
              + ", ".join(f"{r}={v:.3f}" for r, v in sorted(last_ran.items())))
        assert max(first_refusal.values()) < 1.0, first_refusal
        assert max(last_ran.values()) < 1.0, last_ran
        # Each refusal is on the ledger as a policy decision of the kill switch.
        for s in steps:
            await wait_for_entry(bus.ledger, task_id, lambda e, s=s: isinstance(
                e.event, ev.StepCompleted) and e.event.data.step_id == s)
        entries = await bus.ledger.read(task_id)
        decisions = [e.event for e in entries if isinstance(e.event, ev.PolicyDecided)]
        assert {d.data.step_id for d in decisions} == set(steps)
        assert all(d.data.decision == "deny" and d.data.tool == "ping"
                   and d.data.rule == "killswitch:tool.ping.=.=" and "incident" in
                   d.data.reason for d in decisions)
        refused_results = [e.event for e in entries if isinstance(e.event, ev.ToolCalled)
                           and e.event.data.error]
        assert len(refused_results) == REPLICAS
        # Enable: calls run again in every replica (the watch saw it too).
        watch.changed.clear()
        assert await board.enable("tool", "ping")
        while watch.check("ping", "ks-agent", None) is not None:
            await asyncio.wait_for(watch.changed.wait(), 5)
            watch.changed.clear()
        before = {r: len(ts) for r, ts in calls.ran.items()}
        task2 = ev.new_id()
        for s in steps:
            await send_step(bus.ledger, ev.StepCommand(task_id=task2, step_id=s,
                                                       skill="ks_ping", input={}))
        await wait_until(calls, lambda: all(len(calls.ran[r]) >= before[r] + 3
                                            for r in replicas))
        calls.stop = True
        for s in steps:
            done = await wait_for_entry(bus.ledger, task2, lambda e, s=s: isinstance(
                e.event, ev.StepCompleted | ev.StepFailed) and e.event.data.step_id == s)
            assert isinstance(done.event, ev.StepCompleted), done.event
        assert not [e for e in await bus.ledger.read(task2)
                    if isinstance(e.event, ev.PolicyDecided)]
    finally:
        calls.stop = True
        await board.enable("tool", "ping")
        for w in workers:
            await w.stop()
        await watch.stop()
        for nc in conns:
            await nc.close()


async def test_a_disabled_agent_fails_its_steps_with_a_policy_decision(bus) -> None:
    calls = Calls()
    spec = make_spec(calls)
    worker = Worker(spec, model_for("one", calls), bus.nc, bus.js, replica="ks-one")
    board = KillSwitchBoard(bus.js)
    await board.disable(KillRule(kind="agent", name="ks-agent", tenant="t-off",
                                 reason="offboarded"))
    await worker.start()
    try:
        off = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="ks_ping", input={},
                             tenant="t-off")
        await send_tenant_step(bus.ledger, off)
        done = await wait_for_entry(bus.ledger, off.task_id, lambda e: isinstance(
            e.event, ev.StepCompleted | ev.StepFailed))
        assert isinstance(done.event, ev.StepFailed) and done.event.data.code == "disabled"
        assert not calls.ran
        decided = [e.event for e in await bus.ledger.read(off.task_id)
                   if isinstance(e.event, ev.PolicyDecided)]
        assert [d.data.rule for d in decided] == ["killswitch:agent.ks-agent.=.t-off"]
        # Another tenant's task runs.
        calls.stop = True
        other = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="ks_ping",
                               input={}, tenant="t-on")
        await send_tenant_step(bus.ledger, other)
        done = await wait_for_entry(bus.ledger, other.task_id, lambda e: isinstance(
            e.event, ev.StepCompleted | ev.StepFailed))
        assert isinstance(done.event, ev.StepCompleted), done.event
        # A command claiming another tenant than its submission does not escape: the
        # worker takes the tenant from the ledger.
        forged = ev.StepCommand(task_id=ev.new_id(), step_id="s1", skill="ks_ping",
                                input={}, tenant="t-on")
        await record_dispatch(bus.ledger, forged, tenant="t-off")
        await bus.js.publish(subjects.work("ks_ping"), forged.model_dump_json().encode())
        done = await wait_for_entry(bus.ledger, forged.task_id, lambda e: isinstance(
            e.event, ev.StepCompleted | ev.StepFailed))
        assert isinstance(done.event, ev.StepFailed) and done.event.data.code == "disabled"
    finally:
        await board.enable("agent", "ks-agent", tenant="t-off")
        await worker.stop()
