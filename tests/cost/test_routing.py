"""Routing per skill on scripted tiers (no bus): rules, escalation on validators, low
confidence and retries, the recorded classifier, budget-aware choices, validators."""

from __future__ import annotations

import json
from typing import Any

import pytest

from jetmesh.agents.costdemo import cheap, make_concierge, strong
from jetmesh.agents.loop import ListRecorder, StepReplay, run_step
from jetmesh.agents.models.sim import ScriptedModel
from jetmesh.agents.models.types import ModelRequest, ModelResponse
from jetmesh.agents.routing import Classifier, Routing, Tier, Validator, validator_errors
from jetmesh.agents.tools import Tool, ToolContext


def ctx(step: str = "s1") -> ToolContext:
    return ToolContext(task_id="t-route", step_id=step, agent="concierge")


class Headroom:
    """A `StepGuard` with a fixed dollar headroom (the budget's own checks are the
    worker's; here only what routing asks)."""

    def __init__(self, usd: float | None) -> None:
        self.usd = usd
        self.asked = 0

    async def before_model_call(self, request: ModelRequest, model: Any) -> object:
        return None

    async def after_model_call(self, token: object, response: ModelResponse,
                               cost_usd: float) -> None:
        if self.usd is not None:
            self.usd -= cost_usd

    async def release(self, token: object) -> None:
        return None

    async def before_tool_call(self, tool: Tool, arguments: dict[str, Any], key: str
                               ) -> str | None:
        return None

    async def before_effect(self, tool: Tool, arguments: dict[str, Any], key: str, *,
                            recheck: bool = False) -> None:
        return None

    def answer(self, tool: str, args_hash: str) -> str | None:
        return None

    async def headroom_usd(self) -> float | None:
        self.asked += 1
        return self.usd


async def answer(question: str, *, spec: Any = None, guard: Any = None, attempt: int = 1,
                 tiers: dict[str, Any] | None = None) -> tuple[Any, ListRecorder]:
    tiers = tiers or {"cheap": cheap(), "strong": strong()}
    rec = ListRecorder()
    out = await run_step(spec or make_concierge(), "answer_order",
                         {"order_id": "A1007", "question": question}, tiers["cheap"],
                         ctx=ctx(), recorder=rec, tiers=tiers, guard=guard, attempt=attempt)
    return out, rec


def routes(rec: ListRecorder) -> list[tuple[str, str, str]]:
    return [(r.tier, r.trigger, r.outcome) for r in rec.routes]


async def test_plain_questions_stay_cheap_and_hard_ones_escalate() -> None:
    out, rec = await answer("where is it?")
    assert out.ok and out.tier == "cheap" and routes(rec) == [("cheap", "default", "chosen")]
    assert [c.model for c in rec.model_calls] == ["tier-cheap", "tier-cheap"]

    # A well-formed answer without the order id: the validator catches it (a silent
    # failure), and the strong tier answers; the escalation names what was wrong.
    out, rec = await answer("why is it late?")
    assert out.ok and out.tier == "strong" and "A1007" in out.output["answer"]
    assert routes(rec) == [("cheap", "default", "chosen"), ("strong", "validator", "chosen")]
    assert "answer must contain order_id" in rec.routes[1].reason
    assert rec.routes[1].from_tier == "cheap" and rec.routes[1].model_call == 2
    assert [c.model for c in rec.model_calls] == ["tier-cheap", "tier-cheap", "tier-strong"]

    out, rec = await answer("compare the eta")
    assert out.ok and out.output["confidence"] > 0.7
    assert routes(rec)[1] == ("strong", "low_confidence", "chosen")

    out, rec = await answer("my lawyer asks")  # the input rule starts it strong
    assert routes(rec) == [("strong", "rule", "chosen")] and out.tier == "strong"
    assert "question /legal|chargeback|lawyer/" in rec.routes[0].reason


async def test_a_retried_step_starts_a_tier_up() -> None:
    out, rec = await answer("where is it?", attempt=2)
    assert out.ok and routes(rec) == [("strong", "retry", "chosen")]
    assert [c.model for c in rec.model_calls] == ["tier-strong", "tier-strong"]


async def test_budget_headroom_keeps_the_step_cheap_or_fails_it() -> None:
    # Enough for the cheap tier's calls, not for one strong call: the escalation is
    # refused, the step stays cheap (its correction turn fails the validator again, and
    # the escalation is refused again).
    guard = Headroom(0.002)
    out, rec = await answer("why is it late?", guard=guard)
    assert routes(rec) == [("cheap", "default", "chosen"), ("cheap", "budget", "stayed"),
                           ("cheap", "budget", "stayed")]
    stayed = rec.routes[1]
    assert stayed.estimate_usd is not None and stayed.headroom_usd is not None
    assert stayed.estimate_usd > stayed.headroom_usd
    assert "cannot cover one call on strong" in stayed.reason
    assert not out.ok and out.code == "invalid_output" and "validators failed" in out.reason
    assert {c.model for c in rec.model_calls} == {"tier-cheap"}

    # A rule wants strong at the start: with on_budget "stay" it starts cheap instead.
    out, rec = await answer("legal question", guard=Headroom(0.002))
    assert routes(rec) == [("cheap", "budget", "stayed")] and out.ok

    # on_budget "fail": the step fails with that reason, and no strong call is made.
    spec = make_concierge()
    routing = spec.cost.routing["answer_order"].model_copy(update={"on_budget": "fail"})
    spec.cost = spec.cost.model_copy(update={"routing": {"answer_order": routing}})
    out, rec = await answer("why is it late?", spec=spec, guard=Headroom(0.002))
    assert out.code == "budget_exceeded" and "routing:" in out.reason
    assert routes(rec)[-1] == ("strong", "budget", "refused")
    assert {c.model for c in rec.model_calls} == {"tier-cheap"}

    # No dollar limit: nothing stands in the way.
    out, rec = await answer("why is it late?", guard=Headroom(None))
    assert out.tier == "strong"


async def test_the_classifier_call_is_recorded_and_replayed() -> None:
    classifier = ScriptedModel(json.dumps({"tier": "strong", "reason": "a dispute"}),
                               name="tier-cheap")
    spec = make_concierge()
    routing = Routing(tiers=[Tier(name="cheap"), Tier(name="strong")],
                      classifier=Classifier(tier="cheap"))
    spec.cost = spec.cost.model_copy(update={"routing": {"answer_order": routing}})
    tiers = {"cheap": classifier, "strong": strong()}
    out, rec = await answer("where is it?", spec=spec, tiers=tiers)
    classifier.assert_complete()
    assert out.ok and routes(rec) == [("strong", "classifier", "chosen")]
    assert "a dispute" in rec.routes[0].reason
    assert [c.purpose for c in rec.model_calls] == ["route", "step", "step"]
    asked = classifier.requests[0]
    assert asked.output_schema is not None
    assert asked.output_schema["properties"]["tier"]["enum"] == ["cheap", "strong"]

    # Replayed from its records: no model is called, the same answer, no new decision.
    again = ListRecorder()
    nobody = ScriptedModel()
    out2 = await run_step(spec, "answer_order", {"order_id": "A1007", "question": "where is it?"},
                          nobody, ctx=ctx(), recorder=again, tiers={"cheap": nobody,
                                                                    "strong": nobody},
                          replay=StepReplay.from_records(rec.model_calls, rec.tool_calls),
                          replay_only=True)
    assert out2.output == out.output and out2.model_calls == 0 and not nobody.requests
    assert out2.replayed_model_calls == 3 and again.routes == [] and again.model_calls == []


def test_validators_regex_ranges_cross_field_and_callables() -> None:
    vs = [Validator(name="id", path="order_id", regex=r"^A\d{4}$"),
          Validator(name="total", path="total", min=0, max=100),
          Validator(name="state", path="state", one_of=["paid", "shipped"]),
          Validator(name="echo", path="echo", equals_path="order_id"),
          Validator(name="named", path="answer", contains_path="order_id"),
          Validator(name="sum", check=lambda o: None if o.get("total") == sum(o.get("items", []))
                    else "total is not the sum of the items")]
    good = {"order_id": "A1001", "total": 30, "state": "paid", "echo": "A1001",
            "answer": "A1001 is paid", "items": [10, 20]}
    assert validator_errors(vs, good) == []
    bad = {"order_id": "B1", "total": 130, "state": "lost", "echo": "A1001",
           "answer": "it is paid", "items": [10, 20]}
    errors = validator_errors(vs, bad)
    assert [e.split(":")[0] for e in errors] == ["id", "total", "state", "echo", "named", "sum"]
    assert validator_errors(vs[:1], {}) == ["id: order_id is missing"]


def test_routing_refuses_unknown_tiers() -> None:
    with pytest.raises(ValueError, match="unknown tiers"):
        Routing(tiers=[Tier(name="cheap")], classifier=Classifier(tier="strong"))
    with pytest.raises(ValueError, match="duplicate tier"):
        Routing(tiers=[Tier(name="cheap"), Tier(name="cheap")])
