"""Crash safety: kill -9 the orchestrator and a worker during a run of 50 tasks."""

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
from jetmesh.orchestrator.registry import live_agents
from jetmesh.orchestrator.state import TaskStatus

WORKFLOW = """
name: effects
description: two side-effecting steps, one after the other
steps:
  - id: first
    skill: effect
    input: {label: {"$ref": "task.input.label"}}
  - id: second
    skill: effect
    input: {label: {"$ref": "steps.first.output.text"}}
    depends_on: [first]
"""


async def test_kill_9_orchestrator_and_worker_mid_run(fresh_server: EmbeddedNats,
                                                       tmp_path: Path) -> None:
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir()
    (wf_dir / "effects.yaml").write_text(WORKFLOW)
    effects = tmp_path / "effects.jsonl"
    effects.touch()
    env = {
        "NATS_URL": fresh_server.url, "JETMESH_ACK_WAIT_S": "2", "JETMESH_TICK_S": "0.2",
        "JETMESH_SIM_LATENCY_MS": "60", "JETMESH_MODEL_PROVIDER": "sim",
        "JETMESH_WORKFLOWS_DIR": str(wf_dir), "JETMESH_TEST_EFFECTS_FILE": str(effects),
        "PYTHONPATH": str(Path(__file__).parent), "JETMESH_DATA_DIR": str(tmp_path),
    }
    procs = {
        "orch": spawn(["orchestrator"], env, tmp_path / "orch.log"),
        "w1": spawn(["worker", "effects_agent:SPEC"], env, tmp_path / "w1.log"),
        "w2": spawn(["worker", "effects_agent:SPEC"], env, tmp_path / "w2.log"),
    }
    kills = 0
    try:
        async with Client(fresh_server.url) as c:
            for _ in range(100):
                if any(a.name == "effects" and len(a.replicas) == 2
                       for a in await live_agents(c.js)):
                    break
                await asyncio.sleep(0.1)
            ids = [await c.submit("effects", workflow="effects", input={"label": f"t{i}"})
                   for i in range(50)]
            done: set[str] = set()

            async def watch() -> None:
                nonlocal kills
                async for entry in c.ledger.follow(filter_subject=subjects.ALL_TASK_EVENTS):
                    if isinstance(entry.event, ev.TERMINAL_TASK_EVENTS):
                        done.add(entry.event.subject)
                    if len(done) == 10 and kills == 0:
                        kill9(procs["orch"])
                        kills += 1
                        procs["orch"] = spawn(["orchestrator"], env, tmp_path / "orch2.log")
                    if len(done) == 25 and kills == 1:
                        kill9(procs["w1"])
                        kills += 1
                        procs["w1"] = spawn(["worker", "effects_agent:SPEC"], env,
                                            tmp_path / "w3.log")
                    if done >= set(ids):
                        return

            await asyncio.wait_for(watch(), 120)
            states = [await c.state(t) for t in ids]
    finally:
        for p in procs.values():
            stop(p)
    assert kills == 2
    assert Counter(s.status for s in states) == {TaskStatus.COMPLETED: 50}
    lines = [json.loads(x) for x in effects.read_text().splitlines()]
    per_step = Counter((x["task"], x["step"]) for x in lines)
    twice = {k: n for k, n in per_step.items() if n > 1}
    assert not twice, f"side effects ran twice: {twice}"
    assert len(per_step) == 100
    print(f"\n50 tasks, {kills} kills (orchestrator, worker), 0 lost, "
          f"{len(lines)} side effects for 100 steps, 0 duplicates")
