"""The quick start's demo answers on the simulated model read as answers: a tool result
the agent sees inside its untrusted-data envelope (shared memory's `recall`, an MCP
tool) is read for its data, so the envelope's tag and notice never reach the answer,
and a search that found nothing says so ("Summarise our returns policy" in the README)."""

from __future__ import annotations

import json

from jetmesh.agents.builtin.researcher import ResearchOutput, search_kb
from jetmesh.agents.models.sim import SIM_LABEL, SimModel
from jetmesh.agents.models.types import Message, ModelRequest, ToolCall
from jetmesh.agents.tools import untrusted_block

QUESTION = "Summarise our returns policy"


def _request(recall_hits: list[dict[str, object]]) -> ModelRequest:
    kb = search_kb.fn(query=QUESTION).model_dump(mode="json")
    recall = untrusted_block("tool:recall", json.dumps({"hits": recall_hits, "scope": "agent"}))
    return ModelRequest(
        messages=[
            Message(role="user", content=json.dumps({"question": QUESTION})),
            Message(role="assistant", tool_calls=[
                ToolCall(id="c1", name="recall", arguments={"query": QUESTION}),
                ToolCall(id="c2", name="search_kb", arguments={"query": QUESTION})]),
            Message(role="tool", tool_call_id="c1", content=recall),
            Message(role="tool", tool_call_id="c2", content=json.dumps(kb)),
        ],
        output_schema=ResearchOutput.model_json_schema(),
    )


async def test_research_answer_has_no_envelope() -> None:
    res = await SimModel().complete(_request([]))
    answer = json.loads(res.text)["answer"]
    assert answer.startswith(SIM_LABEL), answer
    assert "30 days" in answer  # from the knowledge base article
    assert "recall: nothing found" in answer
    assert "untrusted-data" not in answer and "not instructions" not in answer, answer


async def test_recalled_memory_is_read_from_inside_the_envelope() -> None:
    hit = {"id": "m1", "memory": "Ann prefers store credit over a refund", "score": 0.9}
    res = await SimModel().complete(_request([hit]))
    answer = json.loads(res.text)["answer"]
    assert "Ann prefers store credit over a refund" in answer, answer
    assert "untrusted-data" not in answer and "not instructions" not in answer, answer
