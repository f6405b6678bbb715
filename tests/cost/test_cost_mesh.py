"""The cost levers through a real mesh (nats-server, orchestrator, worker): the eval suite
routed against all-strong, routing decisions in `jetmesh show` and in traces, cache
figures in the stats record, and randomized tasks on tight budgets: no overrun, and the
ledger's spend equals the budget counters."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jetmesh.agents.costdemo import cheap, make_concierge
from jetmesh.bus import events as ev
from jetmesh.bus.budgets import BudgetBook
from jetmesh.orchestrator.cli import app
from jetmesh.orchestrator.evals import load_suite, report, run_suite
from jetmesh.orchestrator.state import fold
from jetmesh.orchestrator.stats import task_summary
from jetmesh.orchestrator.telemetry import build_spans

EVALS = Path(__file__).resolve().parents[2] / "evals"
STRONG = {"concierge": "sim:jetmesh.agents.costdemo:strong"}


async def test_routing_costs_under_half_of_all_strong_at_the_same_pass_rate(
        make_mesh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETMESH_FORK_MODEL_MODULES", "jetmesh.agents.costdemo")
    mesh = await make_mesh([make_concierge()], worker_model=cheap())
    suite = load_suite(EVALS / "cost.yaml")
    routed = report(suite, "routed", None,
                    await run_suite(mesh.client, suite, run_id="cost-routed"))
    strong = report(suite, "strong", STRONG,
                    await run_suite(mesh.client, suite, run_id="cost-strong", models=STRONG))
    r, s = routed["summary"], strong["summary"]
    assert r["pass_rate"] == s["pass_rate"] == 1.0, json.dumps(
        [c for c in routed["cases"] + strong["cases"] if c["tier"] != "pass"])[:2000]
    saved = 1 - r["cost_usd"] / s["cost_usd"]
    print(f"\nrouted ${r['cost_usd']:.6f} vs all-strong ${s['cost_usd']:.6f}: {saved:.1%} less")
    assert saved >= 0.5
    cases = {c["id"]: c for c in routed["cases"]}

    def routing_cost(rep: dict) -> float:  # the routed skill's cases only
        return sum(r["cost_usd"] for c in rep["cases"] if not c["id"].startswith("digest")
                   for r in c["runs"])

    routing_saved = 1 - routing_cost(routed) / routing_cost(strong)
    print(f"routing cases alone: ${routing_cost(routed):.6f} vs ${routing_cost(strong):.6f}: "
          f"{routing_saved:.1%} less")
    assert routing_saved >= 0.5
    tokens = {k: cases[k]["runs"][0]["tokens"] for k in ("digest-pages", "digest-pages-full")}
    assert tokens["digest-pages"] < 0.5 * tokens["digest-pages-full"]

    # `jetmesh eval compare` prints the change.
    (tmp_path / "strong.json").write_text(json.dumps(strong))
    (tmp_path / "routed.json").write_text(json.dumps(routed))
    out = CliRunner().invoke(app, ["eval", "compare", str(tmp_path / "strong.json"),
                                   str(tmp_path / "routed.json")])
    assert out.exit_code == 0, out.output
    printed = " ".join(out.output.split())
    assert f"({-saved:+.1%})" in printed and "pass rate 100% -> 100%" in printed

    # The escalated case: both decisions are events with their reasons ...
    tid = cases["why-a1007"]["runs"][0]["task_id"]
    entries = await mesh.client.events(tid)
    routes = [e.event.data for e in entries if isinstance(e.event, ev.ModelRouted)]
    assert [(x.tier, x.trigger) for x in routes] == [("cheap", "default"), ("strong", "validator")]
    assert fold(tid, entries).ignored == []
    # ... shown by `jetmesh show` ...
    shown = await asyncio.to_thread(CliRunner().invoke, app, ["show", tid, "--url", mesh.url],
                                    env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert "-> strong sim/tier-strong [validator, from cheap]: answer names the order" in \
        " ".join(shown.output.split())
    # ... and in the trace, as span events of the step's invoke_agent span.
    spans = build_spans(tid, entries)
    agent = next(sp for sp in spans if sp.name == "invoke_agent concierge")
    routed_events = [e for e in agent.events if e.name == "jetmesh.model.routed"]
    assert [e.attributes["jetmesh.route.tier"] for e in routed_events] == ["cheap", "strong"]
    assert routed_events[1].attributes["jetmesh.route.trigger"] == "validator"

    # Stats: the prompt cache's reads per agent, the escalation, the silent failure.
    summary = task_summary(tid, entries)
    assert summary is not None
    row = summary["agents"]["concierge"]
    assert row["cache_read_tokens"] > 0 and row["escalations"] == 1
    assert summary["silent_failures_caught"] == 1
    # The strong run's forks looked the orders up again: served from the shared cache.
    fork = next(c for c in strong["cases"] if c["id"] == "plain-a1001")["runs"][0]["task_id"]
    called = [e.event.data for e in await mesh.client.events(fork)
              if isinstance(e.event, ev.ToolCalled)]
    assert [(t.tool, t.cache_hit) for t in called] == [("order_record", True)]

    # Compaction events are on the digest's step, linked to the calls they replace.
    tid = cases["digest-pages"]["runs"][0]["task_id"]
    entries = await mesh.client.events(tid)
    compactions = [e.event.data for e in entries if isinstance(e.event, ev.ContextCompacted)]
    keys = {e.event.data.idempotency_key for e in entries if isinstance(e.event, ev.ToolCalled)}
    assert compactions and {k for c in compactions for k in c.tool_calls} <= keys
    calls = [e.event.data for e in entries if isinstance(e.event, ev.ModelCalled)]
    assert len(calls) == 41 and max(c.input_tokens for c in calls) <= 4000


QUESTIONS = ["where is it?", "why is it late?", "compare the eta", "legal question",
             "has it shipped?"]


async def campaign(make_mesh, n: int, seed: int) -> None:
    mesh = await make_mesh([make_concierge()], worker_model=cheap())
    rng = random.Random(seed)
    budgets = [round(rng.uniform(0.0002, 0.004), 6) for _ in range(n)]
    ids = [f"budget-{seed}-{i}" for i in range(n)]
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            await mesh.client.submit(
                task_id=ids[i], workflow="skill:answer_order",
                input={"order_id": f"A{1001 + rng.randrange(30)}",
                       "question": rng.choice(QUESTIONS)},
                budget=ev.Budget(max_usd=budgets[i]))
            await mesh.client.result(ids[i], timeout=90)

    await asyncio.gather(*(one(i) for i in range(n)))
    book = BudgetBook(mesh.client.js)
    outcomes: dict[str, int] = {}
    for tid, cap in zip(ids, budgets, strict=True):
        state = await mesh.client.state(tid)
        usage = await book.usage(tid)
        assert state.cost_usd <= cap + 1e-12, (tid, state.cost_usd, cap)  # no overrun
        assert usage.spent_usd == pytest.approx(state.cost_usd, abs=1e-12), tid
        assert usage.reserved == {}
        codes = sorted({st.code for st in state.steps.values() if st.code})
        key = state.status.value + "".join(f":{c}" for c in codes)
        outcomes[key] = outcomes.get(key, 0) + 1
    print(f"\n{n} tasks on budgets ${min(budgets)}..${max(budgets)}: {outcomes}")
    assert outcomes.get("completed", 0) > 0 and len(outcomes) > 1


async def test_randomized_tight_budgets_never_overrun(make_mesh) -> None:
    await campaign(make_mesh, 100, seed=18)


@pytest.mark.slow
async def test_a_thousand_randomized_tight_budgets_never_overrun(make_mesh) -> None:
    await campaign(make_mesh, 1000, seed=1018)
