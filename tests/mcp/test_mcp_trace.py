"""An MCP tool call carries its own `execute_tool` span as the request's
`_meta.traceparent` (the SDK's propagation, SEP-414), so the server's spans nest under
the tool call the telemetry role derives from the ToolCalled event: the span id the
server sees is the one that event's id gives."""

from __future__ import annotations

from mcp_support import Fixture, stdio_config

from jetmesh.agents import ListRecorder, ToolContext, run_step
from jetmesh.agents.mcp.toolset import McpToolset
from jetmesh.agents.models.sim import ScriptedModel, tool_call
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import tracing
from jetmesh.bus.tracecontext import (
    agent_traceparent,
    parse_traceparent,
    task_traceparent,
    tool_traceparent,
)


class IdRecorder(ListRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.tool_event_ids: list[str | None] = []

    async def record_tool_call(self, data, *, event_id=None) -> None:  # type: ignore[no-untyped-def]
        self.tool_event_ids.append(event_id)
        await super().record_tool_call(data, event_id=event_id)


async def test_the_server_gets_the_tool_calls_own_span_as_parent(fixture_dir: Fixture) -> None:
    spec = AgentSpec(name="mcp-test", description="d", mcp_servers=[stdio_config(fixture_dir)],
                     skills=[SkillSpec(id="ask", name="Ask", description="d")])
    toolset = await McpToolset.open(spec)
    try:
        bound = toolset.attach(spec)
        model = ScriptedModel(tool_call("fx__lookup", key="alpha"),
                              tool_call("fx__lookup", key="beta"), "done")
        rec = IdRecorder()
        agent_tp = agent_traceparent(task_traceparent("t-mcp-trace", None), "started-1")
        with tracing.attached(agent_tp):
            result = await run_step(bound, "ask", {"q": "look"}, model, recorder=rec,
                                    ctx=ToolContext(task_id="t-mcp-trace", step_id="s1",
                                                    agent="mcp-test"))
        assert result.ok, result
    finally:
        await toolset.aclose()
    seen = [c["traceparent"] for c in fixture_dir.calls("lookup")]
    assert len(seen) == 2 and len(set(rec.tool_event_ids)) == 2 and None not in rec.tool_event_ids
    assert [c.idempotency_key for c in rec.tool_calls] and len(rec.tool_calls) == 2
    want = [tool_traceparent(agent_tp, i) for i in rec.tool_event_ids]  # type: ignore[arg-type]
    assert seen == want
    # Same trace as the step, a span of its own per call (not the agent's span).
    assert {parse_traceparent(s)[0] for s in seen} == {parse_traceparent(agent_tp)[0]}  # type: ignore[index]
    assert agent_tp not in seen
