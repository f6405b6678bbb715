"""The bundled example: the notes agent over the bundled MCP server, through the mesh."""

from __future__ import annotations

from jetmesh.agents.mcp.example import SPEC
from jetmesh.bus import events as ev
from jetmesh.orchestrator.state import TaskStatus


async def test_bundled_example_agent_uses_the_bundled_mcp_server(make_mesh) -> None:
    mesh = await make_mesh([SPEC])  # the sim model calls each offered tool once
    tid = await mesh.client.submit("shipping", workflow="skill:notes_answer",
                                   input={"query": "shipping", "title": "t", "body": "b"})
    state = await mesh.client.result(tid, timeout=60)
    assert state.status is TaskStatus.COMPLETED, state.reason
    calls = {e.event.data.tool: e.event.data for e in await mesh.client.events(tid)
             if isinstance(e.event, ev.ToolCalled)}
    assert set(calls) == {"notes__add_note", "notes__search_notes"}
    assert "2 business days" in calls["notes__search_notes"].output["text"]
    assert calls["notes__add_note"].side_effects and not calls["notes__search_notes"].side_effects
