"""The bundled example of an agent using an MCP server's tools (offline): the ``notes``
agent over the bundled notebook server (`example_server`, started over stdio).

    jetmesh worker jetmesh.agents.mcp.example:SPEC
    jetmesh submit "shipping" --workflow skill:notes_answer --input '{"query": "shipping"}'

``notes__search_notes`` is read-only by configuration; ``notes__add_note`` is a write,
so the policy decides it (allowed by default, recorded on the step's line).
"""

from __future__ import annotations

import sys

from jetmesh.agents.spec import AgentSpec, SkillSpec

from .config import McpServerConfig, StdioServer

NOTES_SERVER = McpServerConfig(
    name="notes",
    transport=StdioServer(command=sys.executable,
                          args=["-m", "jetmesh.agents.mcp.example_server"]),
    read_only=["search_notes"],
)

SPEC = AgentSpec(
    name="notes",
    description="Answers from a notebook kept by an MCP server, and adds to it.",
    instructions="Search the notes for the query; when asked to, add a note. Answer briefly.",
    skills=[SkillSpec(
        id="notes_answer", name="Answer from notes",
        description="Search the notebook (and add a note when a title and body are given).",
        input_schema={"type": "object", "required": ["query"],
                      "properties": {"query": {"type": "string"},
                                     "title": {"type": "string"},
                                     "body": {"type": "string"}}},
        tools=["notes__search_notes", "notes__add_note"])],
    mcp_servers=[NOTES_SERVER],
)
"""The example agent; its model is the deployment's (the sim calls both tools once)."""
