"""The built-in agents: valid schemas, one end-to-end step each, the order book, refunds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

import jetmesh.agents as agents_pkg
from jetmesh.agents import (
    BUILTIN_AGENTS,
    ListRecorder,
    ToolContext,
    builtin_names,
    get_agent,
    run_step,
)
from jetmesh.agents.builtin.support import issue_refund
from jetmesh.agents.builtin.triage import keyword_signals
from jetmesh.agents.errors import UnknownAgent
from jetmesh.agents.models.sim import ScriptedModel, SimModel, tool_call

STEP_INPUTS: dict[tuple[str, str], dict[str, Any]] = {
    ("triage", "triage"): {"text": "URGENT: I was charged twice for order A1003!"},
    ("researcher", "research"): {"question": "How long do refunds take?"},
    ("extractor", "extract"): {
        "text": "Order A1002 from Ben, 12.50 USD.",
        "schema": {
            "type": "object",
            "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}},
        },
    },
    ("writer", "write"): {"brief": "Tell the customer the parcel is delayed.", "facts": []},
    ("reviewer", "review"): {"draft": "Hello A1001", "criteria": ["at most 50 words"]},
    ("support", "order_status"): {"order_id": "A1004", "question": "Where is it?"},
    ("support", "refund"): {"order_id": "A1002", "amount_usd": 5.0, "reason": "damaged"},
    ("orders", "lookup_order"): {"order_id": "A1001"},
}


def ctx_for(agent: str, step: str = "s1") -> ToolContext:
    return ToolContext(task_id="t1", step_id=step, agent=agent)


def test_registry() -> None:
    assert builtin_names() == sorted(
        ["triage", "researcher", "extractor", "writer", "reviewer", "support", "orders"]
    )
    assert get_agent("orders") is BUILTIN_AGENTS["orders"]
    with pytest.raises(UnknownAgent) as info:
        get_agent("nobody")
    assert "orders" in str(info.value) and isinstance(info.value, KeyError)
    assert info.value.known == builtin_names()


def test_every_skill_and_tool_schema_is_valid_2020_12() -> None:
    for spec in BUILTIN_AGENTS.values():
        assert len(spec.instructions) > 200 or not spec.needs_model, spec.name
        for skill in spec.skills:
            jsonschema.Draft202012Validator.check_schema(skill.input_schema)
            jsonschema.Draft202012Validator.check_schema(skill.output_schema)
        for t in spec.tools:
            jsonschema.Draft202012Validator.check_schema(t.definition().input_schema)


def test_every_skill_has_a_step_input_here() -> None:
    assert {(a.name, s.id) for a in BUILTIN_AGENTS.values() for s in a.skills} == set(STEP_INPUTS)
    for (agent, skill), data in STEP_INPUTS.items():
        assert get_agent(agent).validate_input(skill, data) == [], (agent, skill)


@pytest.mark.parametrize(
    ("agent", "skill"),
    [k for k in STEP_INPUTS if k != ("orders", "lookup_order")],
)
async def test_each_agent_runs_a_step_on_the_dry_run_model(agent: str, skill: str) -> None:
    spec = get_agent(agent)
    rec = ListRecorder()
    out = await run_step(
        spec, skill, STEP_INPUTS[agent, skill], SimModel(), ctx=ctx_for(agent), recorder=rec
    )
    assert out.status == "completed", out.reason
    assert spec.validate_output(skill, out.output) == []
    offered = spec.tools_for(skill)
    assert out.tool_calls == len(offered)
    assert out.model_calls == (2 if offered else 1)


async def test_support_order_status_is_one_call_one_tool_one_call() -> None:
    spec = get_agent("support")
    model = ScriptedModel(
        tool_call("lookup_order", order_id="A1004"),
        lambda req: json.dumps(
            {"answer": "It is on its way.", "order": json.loads(req.messages[-1].content)["order"]}
        ),
    )
    rec = ListRecorder()
    out = await run_step(
        spec, "order_status", {"order_id": "A1004"}, model, ctx=ctx_for("support"), recorder=rec
    )
    model.assert_complete()
    assert out.status == "completed"
    assert (out.model_calls, out.tool_calls) == (2, 1)
    assert out.output is not None and out.output["order"]["order_id"] == "A1004"
    assert [t.tool for t in rec.tool_calls] == ["lookup_order"]
    assert rec.tool_calls[0].side_effects is False


async def test_orders_agent_serves_known_and_unknown_ids_without_a_model() -> None:
    spec = get_agent("orders")
    assert not spec.needs_model
    no_model = ScriptedModel()
    rec = ListRecorder()
    known = await run_step(
        spec, "lookup_order", {"order_id": "A1001"}, no_model, ctx=ctx_for("orders"), recorder=rec
    )
    assert known.status == "completed" and known.output is not None
    assert known.output["found"] is True and known.output["order"]["order_id"] == "A1001"
    unknown = await run_step(
        spec,
        "lookup_order",
        {"order_id": "Z9999"},
        no_model,
        ctx=ctx_for("orders", "s2"),
        recorder=rec,
    )
    assert unknown.status == "completed"
    assert unknown.output == {"order_id": "Z9999", "found": False, "order": None}
    assert no_model.requests == [] and known.model_calls == 0
    assert [t.tool for t in rec.tool_calls] == ["lookup_order", "lookup_order"]
    assert spec.validate_output("lookup_order", unknown.output) == []
    bad = await run_step(
        spec, "lookup_order", {"order_id": ""}, no_model, ctx=ctx_for("orders"), recorder=rec
    )
    assert bad.status == "failed" and bad.code == "invalid_input"


async def test_orders_replay_reuses_the_recorded_lookup() -> None:
    spec = get_agent("orders")
    rec = ListRecorder()
    first = await run_step(
        spec,
        "lookup_order",
        {"order_id": "A1001"},
        ScriptedModel(),
        ctx=ctx_for("orders"),
        recorder=rec,
    )
    again = await run_step(
        spec,
        "lookup_order",
        {"order_id": "A1001"},
        ScriptedModel(),
        ctx=ctx_for("orders"),
        recorder=ListRecorder(),
        replay=rec.replay(),
    )
    assert again.output == first.output and again.tool_calls == 0
    assert again.replayed_tool_calls == 1


async def test_issue_refund_writes_once_per_idempotency_key(data_dir: Path) -> None:
    args = {"order_id": "A1002", "amount_usd": 5.0, "reason": "arrived damaged"}
    ctx = ToolContext(task_id="t1", step_id="s1", agent="support", idempotency_key="k-1")
    first = await issue_refund.invoke(args, ctx)
    second = await issue_refund.invoke(args, ctx)
    assert first.ok and second.ok and first.output and second.output
    assert first.output["already_issued"] is False and second.output["already_issued"] is True
    assert first.output["refund_id"] == second.output["refund_id"]
    lines = (data_dir / "refunds.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["idempotency_key"] == "k-1"
    other = await issue_refund.invoke(args, ToolContext("t1", "s2", "support", "k-2"))
    assert other.ok and len((data_dir / "refunds.jsonl").read_text().splitlines()) == 2


async def test_issue_refund_refuses_more_than_the_order_total() -> None:
    ctx = ToolContext(task_id="t1", step_id="s1", agent="support", idempotency_key="k")
    r = await issue_refund.invoke(
        {"order_id": "A1002", "amount_usd": 1e6, "reason": "too much"}, ctx
    )
    assert not r.ok and "exceeds the order total" in (r.error or "")
    r = await issue_refund.invoke({"order_id": "NOPE", "amount_usd": 1, "reason": "x"}, ctx)
    assert not r.ok and "- reason: String should have at least 3 characters" in (r.error or "")
    assert issue_refund.side_effects and issue_refund.risk == "irreversible"


async def test_refund_step_never_refunds_twice_on_redelivery(data_dir: Path) -> None:
    spec = get_agent("support")
    script = (
        tool_call("lookup_order", order_id="A1002"),
        tool_call("issue_refund", order_id="A1002", amount_usd=5.0, reason="damaged"),
        '{"answer": "Refunded 5 USD.", "refund_id": "R1"}',
    )
    rec = ListRecorder()
    step_input = STEP_INPUTS["support", "refund"]
    out = await run_step(
        spec, "refund", step_input, ScriptedModel(*script), ctx=ctx_for("support"), recorder=rec
    )
    assert out.status == "completed"
    # Redelivered with no recorded calls at all (crash before anything was appended):
    # the tool itself dedupes on the idempotency key.
    again = await run_step(
        spec,
        "refund",
        step_input,
        ScriptedModel(*script),
        ctx=ctx_for("support"),
        recorder=ListRecorder(),
    )
    assert again.status == "completed"
    assert len((data_dir / "refunds.jsonl").read_text().splitlines()) == 1


def test_keyword_signals_is_pure() -> None:
    s = keyword_signals.fn("My kettle shows error E2 and I need help ASAP")
    assert s.suggested_category == "technical" and s.suggested_priority == "urgent"
    assert keyword_signals.fn("just asking about tea").suggested_priority == "low"


async def test_search_kb_ranks_matching_articles() -> None:
    spec = get_agent("researcher")
    search = spec.tool("search_kb")
    assert search is not None
    r = await search.invoke({"query": "how long do refunds take"}, ctx_for("researcher"))
    assert r.ok and r.output is not None and r.output["hits"][0]["id"] == "refunds"


async def test_validate_against_schema_reports_errors() -> None:
    check = get_agent("extractor").tool("validate_against_schema")
    assert check is not None
    schema = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}
    r = await check.invoke({"data": {"a": "x"}, "schema": schema}, ctx_for("extractor"))
    assert r.output == {"valid": False, "errors": ["a: 'x' is not of type 'integer'"]}
    r = await check.invoke({"data": {}, "schema": {"type": 5}}, ctx_for("extractor"))
    assert r.output is not None and "schema itself is invalid" in r.output["errors"][0]


async def test_check_criteria() -> None:
    check = get_agent("reviewer").tool("check_criteria")
    assert check is not None
    r = await check.invoke(
        {
            "draft": "Your order A1001 has shipped.",
            "criteria": ["at most 3 words", "mentions A1001", "must not mention refund", "polite"],
        },
        ctx_for("reviewer"),
    )
    assert r.output is not None
    assert [c["passed"] for c in r.output["checks"]] == [False, True, True, None]


def _isort_key(name: str) -> tuple[int, str]:
    return (0 if name.isupper() else 1 if name[0].isupper() else 2, name)


def test_public_surface_is_sorted_and_complete() -> None:
    names = agents_pkg.__all__
    assert names == sorted(names, key=_isort_key)
    for name in names:
        assert getattr(agents_pkg, name) is not None
