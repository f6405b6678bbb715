"""A worker killed with SIGKILL mid-step: the task's one trace shows both runs of the
step (the dead worker's, abandoned, and the one that took over) and its side effect
executed once, as the effects file (the real invocations) says."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from helpers import kill9, spawn, stop

from jetmesh.bus import events as ev
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.telemetry import task_trace_id

WORKFLOW = """
name: one-effect
description: one side-effecting step
steps:
  - id: only
    skill: effect
    input: {label: {"$ref": "task.input.label"}}
"""


def lines(path: Path) -> list[dict[str, str]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


async def test_worker_killed_mid_step_one_trace_both_runs_one_effect(
        make_mesh, telemetry, receiver, bus, tmp_path: Path, monkeypatch) -> None:
    wf = tmp_path / "workflows"
    wf.mkdir()
    (wf / "one-effect.yaml").write_text(WORKFLOW)
    effects = tmp_path / "effects.jsonl"
    effects.touch()
    monkeypatch.setenv("JETMESH_WORKFLOWS_DIR", str(wf))
    monkeypatch.setenv("JETMESH_ACK_WAIT_S", "2")  # the dead worker's step comes back soon
    mesh = await make_mesh([])
    env = {"NATS_URL": bus.url, "JETMESH_ACK_WAIT_S": "2", "JETMESH_MODEL_PROVIDER": "sim",
           # the model call after the effect is slow: the worker dies in it
           "JETMESH_SIM_LATENCY_MS": "1500", "JETMESH_TEST_EFFECTS_FILE": str(effects),
           "PYTHONPATH": str(Path(__file__).parent.parent / "e2e"),
           "JETMESH_DATA_DIR": str(tmp_path)}
    w1 = spawn(["worker", "effects_agent:SPEC"], env, tmp_path / "w1.log")
    w2 = None
    try:
        tid = await mesh.client.submit("effect", workflow="one-effect",
                                       input={"label": "x"})
        deadline = asyncio.get_running_loop().time() + 40
        while not [x for x in lines(effects) if x["task"] == tid]:
            assert w1.poll() is None, (tmp_path / "w1.log").read_text()
            assert asyncio.get_running_loop().time() < deadline, "the effect never ran"
            await asyncio.sleep(0.02)
        # ... and recorded (the effect runs before its record: a kill between the two
        # leaves the record to the next worker, which finds the effect in doubt).
        while not any(isinstance(e.event, ev.ToolCalled)
                      for e in await mesh.client.events(tid)):
            assert w1.poll() is None, (tmp_path / "w1.log").read_text()
            assert asyncio.get_running_loop().time() < deadline, "the effect never recorded"
            await asyncio.sleep(0.02)
        kill9(w1)  # after its side effect, during its last model call
        w2 = spawn(["worker", "effects_agent:SPEC"], env, tmp_path / "w2.log")
        state = await mesh.client.result(tid, timeout=60)
        assert state.status is TaskStatus.COMPLETED, state.reason
        trace_id = f"{task_trace_id(tid, None):032x}"
        await receiver.wait_for(
            lambda spans: any(s["trace_id"] == trace_id and s["parent_span_id"] == ""
                              for s in spans), what="the task's trace")
    finally:
        stop(w1)
        if w2 is not None:
            stop(w2)
    spans = receiver.trace(trace_id)
    runs = sorted((s for s in spans if s["name"] == "invoke_agent effects"),
                  key=lambda s: s["start"])
    assert len(runs) == 2, [s["name"] for s in spans]
    assert runs[0]["attributes"]["jetmesh.worker"] != runs[1]["attributes"]["jetmesh.worker"]
    assert runs[0]["status"] == 2 and runs[1]["status"] == 1  # abandoned, then completed
    assert runs[1]["attributes"]["jetmesh.step.delivery"] >= 2
    tools = [s for s in spans if s["name"].startswith("execute_tool ")]
    assert len(tools) == 1 and tools[0]["parent_span_id"] == runs[0]["span_id"]
    assert tools[0]["attributes"]["jetmesh.tool.side_effects"] is True
    assert len([x for x in lines(effects) if x["task"] == tid]) == 1
    assert len({s["trace_id"] for s in spans}) == 1
