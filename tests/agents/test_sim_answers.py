"""The offline demo model's answers: labelled, built from the tool results it got (never an
invented id), and its plans picked from the live skills' names, descriptions and tags."""

from __future__ import annotations

import json
from typing import Any

from jetmesh.agents import BUILTIN_AGENTS, ListRecorder, ToolContext, get_agent, run_step
from jetmesh.agents.builtin._data import orders_by_id
from jetmesh.agents.models.sim import SIM_LABEL, SimModel
from jetmesh.agents.models.types import Message, ModelRequest
from jetmesh.orchestrator.planner import Recorder, plan_with_model

SKILLS = [s for a in BUILTIN_AGENTS.values() for s in a.skills]


async def _step(agent: str, skill: str, step_input: dict[str, Any]) -> dict[str, Any]:
    out = await run_step(get_agent(agent), skill, step_input, SimModel(),
                         ctx=ToolContext(task_id="t1", step_id="s1", agent=agent),
                         recorder=ListRecorder())
    assert out.status == "completed" and out.output is not None, out.reason
    return out.output


async def test_an_order_answer_is_labelled_and_states_the_looked_up_record() -> None:
    order = orders_by_id()["A1001"]
    out = await _step("support", "order_status", {"order_id": "A1001"})
    assert out["answer"].startswith(f"{SIM_LABEL} Order A1001: status {order['status']}")
    for fact in ("carrier", "tracking", "eta"):
        if order.get(fact):
            assert str(order[fact]) in out["answer"]
    assert out["order"]["order_id"] == "A1001" and out["order"]["status"] == order["status"]


async def test_an_unknown_order_is_said_to_be_not_found() -> None:
    out = await _step("support", "order_status", {"order_id": "Z9999"})
    assert out["answer"] == f"{SIM_LABEL} Order Z9999: not found." and out["order"] is None


async def test_a_refund_made_names_its_receipt_and_one_refused_names_none() -> None:
    made = await _step("support", "refund", {"order_id": "A1002", "amount_usd": 5.0,
                                             "reason": "arrived damaged"})
    assert made["refund_id"] and made["refund_id"].startswith("R")
    assert f"Refund {made['refund_id']}: amount usd 5" in made["answer"]
    # The call was denied (as the runtime tells the model): no refund id, and why.
    spec = get_agent("support")
    first = await SimModel().complete(ModelRequest(
        messages=[Message(role="user", content=json.dumps(
            {"order_id": "A1029", "amount_usd": 230, "reason": "damaged"}))],
        tools=[t.definition() for t in spec.tools]))
    refund = next(c for c in first.tool_calls if c.name == "issue_refund")
    assert refund.arguments == {"order_id": "A1029", "amount_usd": 230, "reason": "damaged"}
    history = [
        Message(role="user", content="{}"),
        Message(role="assistant", tool_calls=first.tool_calls),
        *[Message(role="tool", tool_call_id=c.id, is_error=c.name == "issue_refund",
                  content=("denied: not today (by ann)" if c.name == "issue_refund"
                           else json.dumps({"order_id": "A1029", "found": True})))
          for c in first.tool_calls]]
    answer = await SimModel().complete(ModelRequest(
        messages=history, output_schema=spec.skill("refund").output_schema))
    data = json.loads(answer.text)
    assert data["refund_id"] is None
    assert "issue_refund was not made: denied: not today (by ann)." in data["answer"]


async def test_triage_takes_its_category_and_priority_from_the_keyword_evidence() -> None:
    out = await _step("triage", "triage", {"text": "URGENT: I was charged twice!"})
    assert (out["category"], out["priority"]) == ("billing", "urgent")


async def test_research_searches_for_the_question_and_answers_from_the_articles() -> None:
    out = await _step("researcher", "research", {"question": "Summarise our returns policy"})
    assert out["answer"].startswith(SIM_LABEL)
    assert "returned within 30 days" in out["answer"]  # the returns article, as found


async def _plan(goal: str, task_input: dict[str, Any]) -> tuple[list[tuple[str, Any]], bool]:
    rec = Recorder("plan", [])
    steps, merge = await plan_with_model(SimModel(), goal, task_input, SKILLS, rec)
    assert len(rec.new) == 1  # one (recorded) model call, replayable like any other
    return [(s.skill, s.input) for s in steps], merge


async def test_the_sim_planner_picks_skills_by_the_goals_words_and_the_input() -> None:
    assert await _plan("Summarise our returns policy", {}) == (
        [("research", {"question": "Summarise our returns policy"})], False)
    assert await _plan("where is my order?", {"order_id": "A1001"}) == (
        [("order_status", {"order_id": "A1001", "question": "where is my order?"})], False)
    assert await _plan("status of my orders", {"order_ids": ["A1001", "A1002"]}) == (
        [("order_status", {"order_id": "A1001", "question": "status of my orders"}),
         ("order_status", {"order_id": "A1002", "question": "status of my orders"})], True)
    assert (await _plan("Write a thank-you note to our customers", {}))[0][0][0] == "write"
    # A refund needs its amount: without one in the input no refund step is planned.
    assert (await _plan("refund order A1002", {"order_id": "A1002"}))[0][0][0] != "refund"
    refund = {"order_id": "A1002", "amount_usd": 5.0, "reason": "damaged"}
    assert await _plan("refund my order", refund) == ([("refund", refund)], False)
