"""The model-call pipeline (agents.calls): replay, budget guard, record, one parser."""

from __future__ import annotations

import pytest

from jetmesh.agents.calls import ModelCaller, parse_json_answer
from jetmesh.agents.errors import StepStopped
from jetmesh.agents.models import Message, ModelError, ModelRequest, ModelResponse, ScriptedModel
from jetmesh.agents.models.types import Model
from jetmesh.bus.events import ModelCalledData

REQUEST = ModelRequest(messages=[Message(role="user", content="hi")])


class Guard:
    """Counts the protocol's calls, in order; refuses when told to."""

    def __init__(self, refuse: bool = False) -> None:
        self.calls: list[str] = []
        self.refuse = refuse

    async def before_model_call(self, request: ModelRequest, model: Model) -> object:
        self.calls.append("before")
        if self.refuse:
            raise StepStopped("budget_exceeded", "no")
        return len(self.calls)

    async def after_model_call(self, token: object, response: ModelResponse,
                               cost_usd: float) -> None:
        self.calls.append(f"after:{token}")

    async def release(self, token: object) -> None:
        self.calls.append(f"release:{token}")


async def test_records_then_replays_with_no_call_no_budget() -> None:
    kept: list[ModelCalledData] = []

    async def keep(data: ModelCalledData) -> None:
        kept.append(data)

    guard, model = Guard(), ScriptedModel("one", "two")
    first = ModelCaller(record=keep, agent="a", guard=guard, step_id="s1", worker="w")
    assert (await first.call(model, REQUEST)).text == "one"
    assert (await first.call(model, REQUEST, purpose="route")).text == "two"
    model.assert_complete()
    assert guard.calls == ["before", "after:1", "before", "after:3"]
    assert [(d.agent, d.step_id, d.worker, d.purpose) for d in kept] == [
        ("a", "s1", "w", "step"), ("a", "s1", "w", "route")]
    assert first.usage.model_calls == 2 and first.replayed == 0
    assert first.usage.input_tokens == sum(d.input_tokens for d in kept) > 0

    guard2 = Guard()
    again = ModelCaller(record=keep, agent="a", recorded=list(kept), guard=guard2)
    silent = ScriptedModel()  # any real call would raise "script exhausted"
    assert [(await again.call(silent, REQUEST)).text for _ in range(2)] == ["one", "two"]
    assert again.replayed == 2 and again.usage.model_calls == 0 and guard2.calls == []
    assert len(kept) == 2  # replayed calls are not recorded again
    assert not again.next_is_replayed and again.calls_so_far == 2


async def test_release_on_failure_refusal_and_replay_only() -> None:
    async def keep(data: ModelCalledData) -> None:
        raise AssertionError("nothing is recorded")

    guard = Guard()
    failing = ModelCaller(record=keep, agent="a", guard=guard)
    with pytest.raises(ModelError):
        await failing.call(ScriptedModel(), REQUEST)
    assert guard.calls == ["before", "release:1"]

    model = ScriptedModel("unused")
    with pytest.raises(StepStopped):
        await ModelCaller(record=keep, agent="a", guard=Guard(refuse=True)).call(model, REQUEST)
    with pytest.raises(StepStopped) as stop:
        await ModelCaller(record=keep, agent="a", replay_only=True).call(model, REQUEST)
    assert stop.value.code == "replay_diverged"
    assert model.remaining == 1 and model.requests == []


def test_one_json_answer_parser() -> None:
    assert parse_json_answer(' {"a": 1} ') == ({"a": 1}, None)
    assert parse_json_answer('Here:\n```json\n{"a": 2}\n```') == ({"a": 2}, None)
    data, problem = parse_json_answer("no json")
    assert data is None and problem is not None and "not JSON" in problem
