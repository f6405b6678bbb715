"""Replay of tasks whose worker was killed -9 mid-step (real processes, real server)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import kill9, spawn, stop

from jetmesh.bus import events as ev
from jetmesh.bus.server import EmbeddedNats
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.registry import live_agents
from jetmesh.orchestrator.replay import run_replay
from jetmesh.orchestrator.state import TaskStatus

E2E = Path(__file__).resolve().parents[1] / "e2e"

WORKFLOW = """
name: effects2
steps:
  - id: first
    skill: effect
    input: {label: {"$ref": "task.input.label"}}
  - id: second
    skill: effect
    input: {label: {"$ref": "steps.first.output.text"}}
    depends_on: [first]
"""


async def test_replay_of_tasks_whose_worker_was_killed_mid_step(fresh_server: EmbeddedNats,
                                                                tmp_path: Path) -> None:
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir()
    (wf_dir / "effects2.yaml").write_text(WORKFLOW)
    effects = tmp_path / "effects.jsonl"
    effects.touch()
    env = {
        "NATS_URL": fresh_server.url, "JETMESH_ACK_WAIT_S": "2", "JETMESH_TICK_S": "0.2",
        "JETMESH_SIM_LATENCY_MS": "150", "JETMESH_MODEL_PROVIDER": "sim",
        "JETMESH_WORKFLOWS_DIR": str(wf_dir), "JETMESH_TEST_EFFECTS_FILE": str(effects),
        "PYTHONPATH": str(E2E), "JETMESH_DATA_DIR": str(tmp_path),
    }
    procs = {
        "orch": spawn(["orchestrator"], env, tmp_path / "orch.log"),
        "w1": spawn(["worker", "effects_agent:SPEC"], env, tmp_path / "w1.log"),
        "w2": spawn(["worker", "effects_agent:SPEC"], env, tmp_path / "w2.log"),
    }
    try:
        async with Client(fresh_server.url) as c:
            for _ in range(200):
                if any(a.name == "effects" and len(a.replicas) == 2
                       for a in await live_agents(c.js)):
                    break
                await asyncio.sleep(0.1)
            ids = [await c.submit("effects", workflow="effects2", input={"label": f"k{i}"})
                   for i in range(12)]
            started: set[str] = set()
            async for entry in c.ledger.follow(filter_subject="jm.task.*.step.*.log"):
                if isinstance(entry.event, ev.ModelCalled):
                    started.add(entry.event.subject)
                if len(started) >= 6:
                    break  # steps of several tasks are in flight now
            kill9(procs["w1"])
            procs["w1"] = spawn(["worker", "effects_agent:SPEC"], env, tmp_path / "w3.log")
            states = await asyncio.gather(*(c.result(t, timeout=120) for t in ids))
            assert all(s.status is TaskStatus.COMPLETED for s in states), \
                [(s.task_id, s.reason) for s in states]
            redelivered = [t for t in ids if any(
                isinstance(e.event, ev.StepStarted) and e.event.data.claim
                for e in await c.events(t))]
            assert redelivered, "the kill hit no step in flight"
            effects_before = effects.read_text()

            reports = [await run_replay(c, t, timeout=60) for t in ids]

            assert all(r.identical for r in reports), \
                [(r.a, r.first_divergence) for r in reports if not r.identical]
            calls = [sum(isinstance(e.event, ev.ModelCalled | ev.ToolCalled)
                         for e in await c.events(r.b)) for r in reports]
            assert calls == [0] * len(ids), "a replay called a model or ran a tool"
            assert effects.read_text() == effects_before, "a replay ran a side effect"
            print(f"\n{len(ids)} tasks ({len(redelivered)} with a step taken over after the "
                  "kill) replayed: 0 model calls, 0 side effects, all identical")
    finally:
        for p in procs.values():
            stop(p)
