"""Memory in a running mesh: episodes from the ledger, recall across tasks.

Each test runs on a nats-server of its own, so the memory service's durable ledger
consumer sees only this test's tasks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from memory_helpers import eventually
from nats.aio.client import Client as NATS

from jetmesh.agents.builtin.researcher import make_researcher
from jetmesh.agents.models.sim import FunctionModel, SimModel
from jetmesh.agents.models.types import Model, ModelRequest, ModelResponse
from jetmesh.agents.spec import AgentSpec
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.server import EmbeddedNats
from jetmesh.bus.streams import declare_streams
from jetmesh.memory import MemoryInferenceDisabled, MemorySettings, MemoryStore
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.service import MemoryService, open_store
from jetmesh.memory.tools import MemoryToolSettings, attach_memory
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.state import TaskStatus
from jetmesh.orchestrator.workflows import Workflow, WorkflowRegistry

ASK = Workflow(name="ask", steps=[ev.PlanStep(
    id="research", skill="research", input={"question": {"$ref": "task.goal"}})])

ANSWERS = {
    "How long do refunds take?": "Refunds reach your card within 7 days; ticket ZEBRA-7.",
    "What did we tell Alice about refunds?": "We told her refunds take a week.",
}


def researcher_turn(request: ModelRequest) -> ModelResponse | str:
    """Recall and search first; then answer from a fixed table."""
    question = json.loads(request.messages[0].content)["question"]
    if not any(m.role == "tool" for m in request.messages):
        from jetmesh.agents.models.sim import tool_call

        return ModelResponse(provider="sim", model="researcher", tool_calls=[
            tool_call("recall", query=question), tool_call("search_kb", query=question)])
    return json.dumps({"answer": ANSWERS[question], "facts": [], "sources": []})


@dataclass
class MemMesh:
    url: str
    store: MemoryStore
    service: MemoryService
    memory: MemoryClient
    client: Client
    orchestrator: Orchestrator
    conns: list[NATS] = field(default_factory=list)
    workers: list[Worker] = field(default_factory=list)

    async def add_worker(self, spec: AgentSpec, model: Model | None) -> AgentSpec:
        nc = await connect(self.url)
        self.conns.append(nc)
        spec = await attach_memory(spec, nc, settings=MemoryToolSettings(tools="auto",
                                                                        remember="on"))
        w = Worker(spec, model, nc, jetstream(nc), replica=f"{spec.name}-test")
        await w.start()
        self.workers.append(w)
        return spec


MakeMesh = Callable[..., Awaitable[MemMesh]]


@pytest.fixture
async def make_mesh(fresh_server: EmbeddedNats, settings: MemorySettings
                    ) -> AsyncIterator[MakeMesh]:
    made: list[MemMesh] = []

    async def make(fact_model: Model | None = None) -> MemMesh:
        url = fresh_server.url
        conns = [await connect(url) for _ in range(3)]
        await declare_streams(jetstream(conns[0]))
        store, _ = await open_store(settings, fact_model=fact_model, use_default_model=False)
        service = MemoryService(conns[0], jetstream(conns[0]), store)
        await service.start()
        orch = Orchestrator(conns[1], jetstream(conns[1]), model=SimModel(),
                            settings=OrchestratorSettings(tick_s=0.1),
                            workflows=WorkflowRegistry([ASK]), use_registry=False)
        await orch.start()
        client = Client(url)
        await client.connect()
        m = MemMesh(url, store, service, MemoryClient(conns[2]), client, orch, conns)
        made.append(m)
        return m

    yield make
    for m in made:
        for w in m.workers:
            await w.stop()
        await m.orchestrator.stop()
        await m.service.stop()
        await m.client.close()
        for nc in m.conns:
            await nc.close()
        await m.store.close()


async def test_episodes_have_provenance_and_the_next_task_recalls_them(
    make_mesh: MakeMesh,
) -> None:
    mesh = await make_mesh()
    assert mesh.store.inference_off_reason == "no model given"
    model = FunctionModel(researcher_turn, name="researcher")
    spec = await mesh.add_worker(make_researcher(), model)
    assert [t.name for t in spec.tools] == ["recall", "search_kb", "remember"]

    first = await mesh.client.submit("How long do refunds take?", workflow="ask",
                                     user_id="alice")
    state = await mesh.client.result(first, timeout=20)
    assert state.status is TaskStatus.COMPLETED, state.reason
    episodes = await eventually(lambda: mesh.store.list(task_id=first, kind="episode"),
                                lambda items: len(items) == 2, what="2 episodes of task 1")
    by_id = {e.episode_id: e for e in episodes}
    step, task = by_id[f"{first}:research"], by_id[f"{first}:task"]

    entries = {e.seq: e for e in await mesh.client.events(first)}
    for episode in (step, task):
        assert episode.user_id == "alice" and episode.task_id == first
        assert set(episode.ledger_seqs) <= entries.keys(), "every seq is one of the task's"
    assert step.agent_id == "researcher" and step.step_id == "research"
    assert "ZEBRA-7" in step.text and "How long do refunds take?" in step.text
    step_events = [entries[s].event for s in step.ledger_seqs]
    assert {type(e) for e in step_events} == {ev.TaskSubmitted, ev.StepDispatched,
                                              ev.StepStarted, ev.ModelCalled, ev.ToolCalled,
                                              ev.StepCompleted}
    assert all(getattr(e.data, "step_id", "research") == "research" for e in step_events)
    assert step.cost_usd == pytest.approx(sum(
        e.data.cost_usd for e in step_events if isinstance(e, ev.ModelCalled)))
    assert isinstance(entries[task.ledger_seqs[-1]].event, ev.TaskCompleted)
    assert task.agent_id is None and "ZEBRA-7" in task.text

    second = await mesh.client.submit("What did we tell Alice about refunds?", workflow="ask",
                                      user_id="alice")
    state = await mesh.client.result(second, timeout=20)
    assert state.status is TaskStatus.COMPLETED, state.reason
    recalls = [e.event.data for e in await mesh.client.events(second)
               if isinstance(e.event, ev.ToolCalled) and e.event.data.tool == "recall"]
    assert len(recalls) == 1 and recalls[0].error is None
    output: dict[str, Any] = recalls[0].output
    assert output["scope"] == "user"
    assert any("ZEBRA-7" in hit["text"] and hit["task_id"] == first for hit in output["hits"])
    # and the researcher saw it first: recall came before search_kb in its first turn
    first_turn = model.requests[-1].messages
    assert [c.name for c in first_turn[1].tool_calls] == ["recall", "search_kb"]


async def test_memory_tools_are_not_attached_when_no_service_answers(
    fresh_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JETMESH_MODEL_PROVIDER", "sim")
    nc = await connect(fresh_server.url)
    try:
        spec = make_researcher()
        assert await attach_memory(spec, nc, settings=MemoryToolSettings()) is spec
        on = await attach_memory(spec, nc, settings=MemoryToolSettings(tools="on"))
        # on the dry-run sim (no key here) only recall: the sim calls every tool offered
        assert [t.name for t in on.tools] == ["recall", "search_kb"]
        assert "recall" in on.instructions
        off = await attach_memory(spec, nc, settings=MemoryToolSettings(tools="on",
                                                                          agents="writer"))
        assert off is spec
    finally:
        await nc.close()


def extractor(request: ModelRequest) -> str:
    """A fact-extraction model: mem0's prompt in, its JSON shape out."""
    assert request.output_schema == {"type": "object"}
    assert "ZEBRA-7" in request.messages[-1].content
    return json.dumps({"memory": [{"text": "Alice's refunds reach her card within 7 days"}]})


async def test_facts_are_extracted_through_the_model_layer_with_provenance(
    make_mesh: MakeMesh,
) -> None:
    facts_model = FunctionModel(extractor, name="extractor")
    mesh = await make_mesh(fact_model=facts_model)
    assert mesh.store.inference_off_reason is None
    await mesh.add_worker(make_researcher(), FunctionModel(researcher_turn))
    tid = await mesh.client.submit("How long do refunds take?", workflow="ask",
                                   user_id="alice")
    assert (await mesh.client.result(tid, timeout=20)).status is TaskStatus.COMPLETED
    facts = await eventually(lambda: mesh.memory.list(kind="fact"), lambda f: len(f) == 1,
                             what="one extracted fact")
    fact = facts[0]
    assert fact.text == "Alice's refunds reach her card within 7 days"
    assert fact.derived_from == [f"{tid}:task"] and fact.derived_task_ids == [tid]
    assert (fact.user_id, fact.task_id) == ("alice", tid)
    assert len(facts_model.requests) == 1
    hits = await mesh.memory.search("how fast are refunds paid", user_id="alice", kind="fact")
    assert [h.id for h in hits] == [fact.id]

    report = await mesh.memory.forget(tid)
    assert report.facts_deleted == [fact.id] and len(report.episodes_deleted) == 2
    assert await mesh.memory.list(user_id="alice") == []


async def test_without_a_model_facts_are_off_and_episodes_still_kept(
    make_mesh: MakeMesh,
) -> None:
    mesh = await make_mesh()
    await mesh.add_worker(make_researcher(), FunctionModel(researcher_turn))
    tid = await mesh.client.submit("How long do refunds take?", workflow="ask")
    assert (await mesh.client.result(tid, timeout=20)).status is TaskStatus.COMPLETED
    await eventually(lambda: mesh.memory.list(task_id=tid), lambda e: len(e) == 2,
                     what="2 episodes")
    status = await mesh.memory.status()
    assert not status.inference and status.inference_off_reason == "no model given"
    assert status.following_ledger and status.episodes == 2
    with pytest.raises(MemoryInferenceDisabled):
        await mesh.store.add_facts("x", derived_from=[f"{tid}:task"], task_id=tid)
