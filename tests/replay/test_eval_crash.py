"""An eval run survives kill -9 of a worker and of the orchestrator (real processes)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from helpers import kill9, spawn, stop

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.server import EmbeddedNats
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.evals import load_suite, run_suite
from jetmesh.orchestrator.registry import live_agents

SUITE = """
name: crash
runs: 3
cases:
""" + "".join(f"""
  - id: lookup{i}
    skill: order_status
    input: {{order_id: A100{i + 1}, question: "where is it?"}}
    checks:
      tools: {{must_call: [lookup_order], order: exact}}
      result:
        - {{path: output.answer, contains: A100{i + 1}}}
""" for i in range(4))


async def test_an_eval_run_finishes_through_kills_and_pays_no_case_twice(
        fresh_server: EmbeddedNats, tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(SUITE)
    suite = load_suite(tmp_path / "s.yaml")
    env = {"NATS_URL": fresh_server.url, "JETMESH_ACK_WAIT_S": "2", "JETMESH_TICK_S": "0.2",
           "JETMESH_SIM_LATENCY_MS": "150", "JETMESH_MODEL_PROVIDER": "sim",
           "JETMESH_DATA_DIR": str(tmp_path)}
    procs = {"orch": spawn(["orchestrator"], env, tmp_path / "orch.log"),
             "w1": spawn(["worker", "support"], env, tmp_path / "w1.log"),
             "w2": spawn(["worker", "support"], env, tmp_path / "w2.log")}
    try:
        async with Client(fresh_server.url) as c:
            for _ in range(200):
                if any(a.name == "support" and len(a.replicas) == 2
                       for a in await live_agents(c.js)):
                    break
                await asyncio.sleep(0.1)
            run = asyncio.create_task(run_suite(c, suite, run_id="crash", timeout=90))
            calls = kills = 0
            async for entry in c.ledger.follow(filter_subject="jm.task.*.step.*.log"):
                if not isinstance(entry.event, ev.ModelCalled):
                    continue
                calls += 1
                if calls == 4:
                    kills += 1
                    kill9(procs["w1"])
                    procs["w1"] = spawn(["worker", "support"], env, tmp_path / "w3.log")
                if calls == 8:
                    kills += 1
                    kill9(procs["orch"])
                    procs["orch"] = spawn(["orchestrator"], env, tmp_path / "orch2.log")
                    break
            assert not run.done() and kills == 2, "the run ended before the kills"
            results = await asyncio.wait_for(run, 120)
            submitted = Counter(
                subjects.task_id_of(subject)
                for _, subject, data in await c.ledger.read_raw(subjects.ALL_TASK_EVENTS)
                if json.loads(data)["type"] == "jetmesh.task.submitted.v1")
    finally:
        for p in procs.values():
            stop(p)
    assert [(r.id, r.tier, r.score) for r in results] == \
        [(f"lookup{i}", "pass", 1.0) for i in range(4)]
    assert len(submitted) == 12 and set(submitted.values()) == {1}  # one task per run
    for r in results:
        for run_ in r.runs:  # each step's model calls counted once: tool turn + answer
            assert run_.model_calls == 2, (run_.task_id, run_.model_calls)
