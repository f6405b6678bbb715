"""`jetmesh replay`, `fork` and `diff` through a real mesh (real nats-server, in-process
orchestrator and workers): replays make no model call and run no side effect, forks
re-run only the forked step and its downstream, and the original ledger stays as it was."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from jetmesh.agents.builtin.support import issue_refund, refunds_file
from jetmesh.agents.models.errors import ModelError
from jetmesh.agents.models.sim import FunctionModel, SimModel, tool_call
from jetmesh.agents.models.types import ModelRequest, ModelResponse, ToolCall
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import events as ev
from jetmesh.orchestrator.replay import run_replay
from jetmesh.orchestrator.state import TaskStatus

sys.path.insert(0, str(Path(__file__).parent))

import replay_fork_models

ORDERS = ["A1001", "A1002", "A1003"]


class CountingSim(SimModel):
    """The dry-run sim, counting the provider calls it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def complete(self, request: ModelRequest) -> ModelResponse:
        self.calls += 1
        return await super().complete(request)


def model_calls(entries: list) -> int:
    return sum(isinstance(e.event, ev.ModelCalled) for e in entries)


async def raw_ledger(bus, task_id: str) -> list[tuple[int, str, bytes]]:
    return await bus.ledger.read_raw(f"jm.task.{task_id}.>")


async def test_replay_of_a_fanout_makes_no_model_call_and_is_identical(make_mesh, bus) -> None:
    planner, workers = CountingSim(), CountingSim()
    mesh = await make_mesh(["support"], planner=planner, worker_model=workers)
    tid = await mesh.client.submit("status of my orders", workflow="fanout",
                                   input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    paid = (planner.calls, workers.calls)
    assert paid == (1, 6)  # the merge; 3 steps x (tool turn, answer)
    before = await raw_ledger(bus, tid)

    cmp = await run_replay(mesh.client, tid, timeout=30)

    assert (planner.calls, workers.calls) == paid, "a replay called a model"
    assert cmp.b_status == "completed"
    assert cmp.identical, cmp.first_divergence
    assert cmp.first_divergence is None
    assert cmp.b_state is not None and cmp.b_state.submitted is not None
    assert cmp.b_state.submitted.replay_of == tid
    assert model_calls(await mesh.client.events(cmp.b)) == 0
    assert cmp.b_state.result == state.result
    assert await raw_ledger(bus, tid) == before  # the original is only read


async def test_replay_of_a_side_effect_runs_it_zero_times(make_mesh, tmp_path, monkeypatch
                                                          ) -> None:
    effects = tmp_path / "effects.log"
    monkeypatch.setenv("JETMESH_TEST_EFFECTS_FILE", str(effects))
    from effects_agent import SPEC

    workers = CountingSim()
    mesh = await make_mesh([SPEC], worker_model=workers)
    tid = await mesh.client.submit("record", workflow="skill:effect", input={"label": "x1"})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    assert len(effects.read_text().splitlines()) == 1
    paid = workers.calls

    cmp = await run_replay(mesh.client, tid, timeout=30)

    assert cmp.identical, cmp.first_divergence
    assert len(effects.read_text().splitlines()) == 1, "the replay ran the side effect"
    assert workers.calls == paid


async def test_replay_that_diverges_calls_nothing_and_names_the_step(make_mesh) -> None:
    """A fork whose patched input changes a step upstream of --from: that step is not
    the original's, so it is not served (and not run): it fails replay_diverged."""
    workers = CountingSim()
    mesh = await make_mesh(["support"], worker_model=workers)
    tid = await mesh.client.submit("status", workflow="fanout", input={"order_ids": ORDERS})
    assert (await mesh.client.result(tid, timeout=30)).status is TaskStatus.COMPLETED
    paid = workers.calls

    fork = ev.ForkSpec(from_step="order2")
    cmp = await run_replay(mesh.client, tid, fork=fork, timeout=30,
                           patch_input={"order_ids": ["A1002", "A1002", "A1003"]})

    assert cmp.b_status == "failed"
    assert not cmp.identical
    assert cmp.first_divergence is not None and "order0" in cmp.first_divergence
    st = cmp.b_state.steps["order0"] if cmp.b_state else None
    assert st is not None and st.code == "replay_diverged", st
    assert workers.calls - paid <= 2  # only order2 (re-run) may call: order0 never does


async def test_fork_from_a_step_reruns_only_downstream(make_mesh, bus, monkeypatch) -> None:
    monkeypatch.setenv("JETMESH_FORK_MODEL_MODULES", "replay_fork_models")
    workers = CountingSim()
    mesh = await make_mesh(["triage", "support", "writer", "reviewer"], worker_model=workers)
    tid = await mesh.client.submit("where is my order?", workflow="support",
                                   input={"order_id": "A1001"})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    before = await raw_ledger(bus, tid)
    paid = workers.calls
    replay_fork_models.CALLS.clear()

    fork = ev.ForkSpec(from_step="draft", models={"writer": "sim:replay_fork_models:loud"})
    cmp = await run_replay(mesh.client, tid, fork=fork, timeout=30)

    assert cmp.b_status == "completed", cmp.b_state.reason if cmp.b_state else None
    b = cmp.b_state
    assert b is not None
    assert b.steps["triage"].model_calls == 0 and b.steps["order"].model_calls == 0
    assert b.steps["draft"].model_calls >= 1 and b.steps["review"].model_calls >= 1
    assert len(replay_fork_models.CALLS) == b.steps["draft"].model_calls  # the fork's model
    assert workers.calls - paid == b.steps["review"].model_calls  # only review on the old one
    changed = {s.step_id for s in cmp.steps if not s.identical}
    assert {"draft"} <= changed and not changed & {"triage", "order"}
    assert cmp.first_divergence is not None and "draft" in cmp.first_divergence
    assert "[loud]" in json.dumps(b.steps["draft"].output)
    assert await raw_ledger(bus, tid) == before  # byte for byte


async def test_fork_dry_runs_side_effects_by_default(make_mesh, tmp_path, monkeypatch) -> None:
    effects = tmp_path / "effects.log"
    monkeypatch.setenv("JETMESH_TEST_EFFECTS_FILE", str(effects))
    from effects_agent import SPEC

    mesh = await make_mesh([SPEC], worker_model=CountingSim())
    tid = await mesh.client.submit("record", workflow="skill:effect", input={"label": "x2"})
    assert (await mesh.client.result(tid, timeout=30)).status is TaskStatus.COMPLETED
    assert len(effects.read_text().splitlines()) == 1

    cmp = await run_replay(mesh.client, tid, fork=ev.ForkSpec(from_step="main"), timeout=30)

    assert len(effects.read_text().splitlines()) == 1, "a dry-run fork ran the effect"
    calls = [e.event.data for e in await mesh.client.events(cmp.b)
             if isinstance(e.event, ev.ToolCalled)]
    assert [(c.tool, c.dry_run, c.side_effects) for c in calls] == \
        [("record_effect", True, True)]
    assert calls[0].output == {"dry_run": True, "would_call": "record_effect",
                               "arguments": {"label": "x2"}}

    real = await run_replay(mesh.client, tid, timeout=30,
                            fork=ev.ForkSpec(from_step="main", effects="real"))
    assert real.b_status == "completed"
    assert len(effects.read_text().splitlines()) == 2  # asked for: run for real


@pytest.mark.parametrize("bad", ["nope"])
async def test_fork_of_an_unknown_step_is_refused(make_mesh, bad: str) -> None:
    mesh = await make_mesh(["support"], worker_model=CountingSim())
    tid = await mesh.client.submit("s", workflow="fanout", input={"order_ids": ORDERS})
    assert (await mesh.client.result(tid, timeout=30)).status is TaskStatus.COMPLETED
    with pytest.raises(ValueError, match="no step"):
        await run_replay(mesh.client, tid, fork=ev.ForkSpec(from_step=bad))


class Ask(BaseModel):
    question: str


def refunder(request: ModelRequest) -> list[ToolCall] | str:
    """Asks for a refund over the approval threshold, then reports the receipt."""
    if not any(m.role == "tool" for m in request.messages):
        return [tool_call("issue_refund", order_id="A1029", amount_usd=230,
                          reason="a damaged parcel")]
    return "refunded: " + [m for m in request.messages if m.role == "tool"][-1].content


REFUNDER = AgentSpec(
    name="refunder", description="Refunds orders.", instructions="Refund.",
    tools=[issue_refund],
    skills=[SkillSpec.from_models("refund_it", "Refund", "Refunds.", input_model=Ask)])


async def wait_for(mesh, tid: str, kind: type) -> ev.Event:
    async for entry in mesh.client.follow(tid):
        if isinstance(entry.event, kind):
            return entry.event
    raise AssertionError(f"task ended without {kind.__name__}")


async def test_replay_of_a_refund_a_human_approved_refunds_nothing(make_mesh, tmp_path,
                                                                  monkeypatch) -> None:
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))
    model = FunctionModel(refunder)
    mesh = await make_mesh([REFUNDER], worker_model=model)
    tid = await mesh.client.submit("refund please", workflow="skill:refund_it",
                                   input={"question": "refund A1029"})
    asked = await asyncio.wait_for(wait_for(mesh, tid, ev.ApprovalRequested), 20)
    assert asked.data.tool == "issue_refund"
    await mesh.client.approve(tid, by="test")
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    refunds = refunds_file().read_text().splitlines()
    assert len(refunds) == 1
    paid = len(model.requests)

    cmp = await run_replay(mesh.client, tid, timeout=30)

    assert cmp.identical, cmp.first_divergence
    assert len(model.requests) == paid
    assert refunds_file().read_text().splitlines() == refunds, "the replay refunded again"
    replayed = await mesh.client.events(cmp.b)
    assert not any(isinstance(e.event, ev.ApprovalRequested | ev.ToolCalled | ev.ModelCalled)
                   for e in replayed)  # served from the recording: nothing to approve


async def test_replay_of_a_failed_task_fails_the_same_way(make_mesh) -> None:
    sim = SimModel()

    async def flaky_on_a1003(request: ModelRequest) -> ModelResponse:
        if "A1003" in request.messages[0].content:
            raise ModelError("sim", "flaky", "the provider refused (scripted)")
        return await sim.complete(request)

    model = FunctionModel(flaky_on_a1003)
    mesh = await make_mesh(["support"], worker_model=model)
    tid = await mesh.client.submit("status", workflow="fanout", input={"order_ids": ORDERS})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.FAILED and state.steps["order2"].code == "model_error"
    paid = len(model.requests)

    cmp = await run_replay(mesh.client, tid, timeout=30)

    assert len(model.requests) == paid
    assert cmp.b_status == "failed"
    assert cmp.identical, cmp.first_divergence
    assert cmp.b_state is not None and cmp.b_state.reason == state.reason


def planner_script(request: ModelRequest) -> str:
    """A scripted LLM planner: one support step per order, then a merge."""
    if request.output_schema is not None:  # the planning call
        ids = json.loads(request.messages[0].content)["input"]["order_ids"]
        return json.dumps({"steps": [
            {"id": f"o{i}", "skill": "order_status", "input": {"order_id": oid}}
            for i, oid in enumerate(ids)], "merge": True})
    return "merged: " + request.messages[0].content


async def test_replays_of_a_planned_task_and_of_replays_and_forks_call_nothing(
        make_mesh) -> None:
    planner, workers = FunctionModel(planner_script, name="planner"), CountingSim()
    mesh = await make_mesh(["support"], planner=planner, worker_model=workers)
    tid = await mesh.client.submit("where are my orders?", input={"order_ids": ORDERS[:2]})
    state = await mesh.client.result(tid, timeout=30)
    assert state.status is TaskStatus.COMPLETED, state.reason
    assert state.planner == "llm:sim/planner"
    fork = await run_replay(mesh.client, tid, fork=ev.ForkSpec(from_step="o1"), timeout=30)
    assert fork.b_status == "completed" and {s.step_id for s in fork.steps} == {"o0", "o1"}
    paid = (len(planner.requests), workers.calls)

    first = await run_replay(mesh.client, tid, timeout=30)
    second = await run_replay(mesh.client, first.b, timeout=30)  # a replay of a replay
    of_fork = await run_replay(mesh.client, fork.b, timeout=30)  # a replay of a fork

    assert (len(planner.requests), workers.calls) == paid
    for cmp in (first, second, of_fork):
        assert cmp.identical, (cmp.a, cmp.b, cmp.first_divergence)
        assert model_calls(await mesh.client.events(cmp.b)) == 0
    assert second.b_state is not None and second.b_state.result == state.result
