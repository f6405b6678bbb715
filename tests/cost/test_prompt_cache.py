"""Prompt caching on the wire: the real SDKs against local servers speaking the Anthropic
and OpenAI formats, through the step loop; cache reads and writes priced from the table."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))

from model_fakes import FakeServer, serve_fake

from jetmesh.agents import AgentSpec, ListRecorder, SkillSpec, ToolContext, run_step, tool
from jetmesh.agents.cost import CostPolicy
from jetmesh.agents.models import switch
from jetmesh.agents.models.anthropic import AnthropicModel
from jetmesh.agents.models.openai import OpenAIModel
from jetmesh.agents.models.pricing import price_for
from jetmesh.agents.models.retry import RetryPolicy
from jetmesh.orchestrator.stats import aggregate, cache_hit_rate


@pytest.fixture(autouse=True)
def _no_real_model_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL", "JETMESH_PRICES_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(switch, "ALLOW_MODEL_REQUESTS", False)  # loopback only


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with serve_fake() as server:
        yield server


@tool(blocking=False)
def lookup(q: str) -> str:
    """Look a term up."""
    return f"{q}: a message bus"


def spec(prompt_cache: bool = True) -> AgentSpec:
    return AgentSpec(name="cacher", description="d", instructions="Be brief. " * 200,
                     skills=[SkillSpec(id="ask", name="Ask", description="Answer.")],
                     tools=[lookup], cost=CostPolicy(prompt_cache=prompt_cache))


def anthropic_body(content: list[dict[str, Any]], stop: str, usage: dict[str, int]
                   ) -> dict[str, Any]:
    return {"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
            "content": content, "stop_reason": stop, "stop_sequence": None, "usage": usage}


async def step(model: Any, s: AgentSpec) -> ListRecorder:
    rec = ListRecorder()
    out = await run_step(s, "ask", {"q": "nats"}, model, recorder=rec,
                         ctx=ToolContext(task_id="t-cache", step_id="s1", agent="cacher"))
    assert out.ok, out.reason
    return rec


async def test_anthropic_cache_control_on_the_stable_prefix_and_cache_prices(
        fake: FakeServer) -> None:
    model = AnthropicModel("claude-sonnet-4-5", api_key="k", base_url=fake.url,
                           retry=RetryPolicy(max_attempts=1))
    fake.enqueue(200, anthropic_body(
        [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "nats"}}],
        "tool_use", {"input_tokens": 20, "output_tokens": 10, "cache_creation_input_tokens": 900,
                     "cache_read_input_tokens": 0}))
    fake.enqueue(200, anthropic_body(
        [{"type": "text", "text": "a bus"}], "end_turn",
        {"input_tokens": 40, "output_tokens": 5, "cache_creation_input_tokens": 30,
         "cache_read_input_tokens": 900}))
    rec = await step(model, spec())
    await model.aclose()
    first, second = (r.body for r in fake.requests)
    for body in (first, second):
        # The prefix (tools, then system) ends in a breakpoint on the system block ...
        assert body["system"] == [{"type": "text", "text": body["system"][0]["text"],
                                   "cache_control": {"type": "ephemeral"}}]
        assert body["system"][0]["text"].startswith("Be brief.")
        assert [t["name"] for t in body["tools"]] == ["lookup"]
        assert "cache_control" not in body["tools"][0]
        # ... and the conversation so far in another, on its last block.
        last = body["messages"][-1]["content"][-1]
        assert last["cache_control"] == {"type": "ephemeral"}
        marked = [b for m in body["messages"] for b in m["content"] if "cache_control" in b]
        assert marked == [last]
    assert second["messages"][-1]["content"][-1]["type"] == "tool_result"

    a, b = rec.model_calls
    assert (a.input_tokens, a.cache_write_tokens, a.cache_read_tokens) == (920, 900, 0)
    assert (b.input_tokens, b.cache_write_tokens, b.cache_read_tokens) == (970, 30, 900)
    p = price_for("anthropic", "claude-sonnet-4-5")
    assert p is not None and p.cache_read_per_mtok == pytest.approx(0.3)
    assert p.cache_write_per_mtok == pytest.approx(3.75)
    # The cached read is priced at the cache price: 900 tokens at $0.30/M, not $3/M.
    assert b.cost_usd == pytest.approx((40 * 3.0 + 900 * 0.3 + 30 * 3.75 + 5 * 15.0) / 1e6)
    assert a.cost_usd == pytest.approx((20 * 3.0 + 900 * 3.75 + 10 * 15.0) / 1e6)

    # Caching off: the system prompt goes as a plain string and nothing is marked.
    plain = AnthropicModel("claude-sonnet-4-5", api_key="k", base_url=fake.url,
                           retry=RetryPolicy(max_attempts=1))
    fake.enqueue(200, anthropic_body([{"type": "text", "text": "ok"}], "end_turn",
                                     {"input_tokens": 5, "output_tokens": 1}))
    await step(plain, spec(prompt_cache=False))
    await plain.aclose()
    body = fake.requests[-1].body
    assert isinstance(body["system"], str) and "cache_control" not in str(body)


async def test_openai_cached_tokens_are_read_from_usage_and_priced(fake: FakeServer) -> None:
    model = OpenAIModel("gpt-4.1-mini", api_key="k", base_url=fake.url,
                        retry=RetryPolicy(max_attempts=1))
    fake.enqueue(200, {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4.1-mini",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "a bus"}}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 8, "total_tokens": 1208,
                  "prompt_tokens_details": {"cached_tokens": 1024}}})
    rec = await step(model, spec())
    await model.aclose()
    body = fake.requests[0].body
    assert "cache_control" not in str(body)  # OpenAI caches prefixes by itself
    (call,) = rec.model_calls
    assert (call.input_tokens, call.cache_read_tokens, call.cache_write_tokens) == (1200, 1024, 0)
    assert call.cost_usd == pytest.approx((176 * 0.4 + 1024 * 0.1 + 8 * 1.6) / 1e6)
    assert call.response["raw"]["usage"]["prompt_tokens_details"]["cached_tokens"] == 1024


def test_stats_hit_rate_per_agent() -> None:
    def record(status: str, agent: dict[str, Any]) -> dict[str, Any]:
        return {"ended_at": "2026-12-04T00:00:00+00:00", "status": status, "code": None,
                "approvals": {"requested": 0, "granted": 0, "denied": 0},
                "approval_wait_s": 0.0, "duration_s": 1.0, "cost_usd": agent["cost_usd"],
                "input_tokens": 0, "output_tokens": 0, "tool_calls": 0, "budget_refusals": 0,
                "retries": 0, "agents": {"a": agent}}

    rows = [record("completed", {"cost_usd": 0.1, "model_calls": 2, "tool_calls": 0,
                                 "tokens": 1100, "input_tokens": 1000,
                                 "cache_read_tokens": 750, "cache_write_tokens": 250,
                                 "tool_cache_hits": 1, "escalations": 0}),
            # an older record, from before the cache figures: they count 0
            record("failed", {"cost_usd": 0.1, "model_calls": 1, "tool_calls": 0,
                              "tokens": 1000})]
    by = aggregate(rows, by="agent")["by_agent"]["a"]
    assert by["prompt_cache_hit_rate"] == pytest.approx(0.75)
    assert by["tool_cache_hits"] == 1 and by["tasks"] == 2
    assert cache_hit_rate({"input_tokens": 0}) is None
