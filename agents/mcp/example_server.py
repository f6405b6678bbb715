"""A small offline MCP server written with the SDK, bundled as the example for agents
that use MCP tools: a notebook (search notes, add a note), in memory.

    python -m jetmesh.agents.mcp.example_server          # stdio
    python -m jetmesh.agents.mcp.example_server --http 127.0.0.1:8765
"""

from __future__ import annotations

import sys
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("notes", version="1.0",
                   instructions="A notebook: search notes, add a note.")

_NOTES: list[dict[str, str]] = [
    {"title": "shipping", "body": "Orders ship within 2 business days; express in 1."},
    {"title": "returns", "body": "Returns are accepted within 30 days with the receipt."},
]


@server.tool(annotations=ToolAnnotations(read_only_hint=True))
def search_notes(query: str) -> list[dict[str, str]]:
    """Notes whose title or body contains the query (case-insensitive)."""
    q = query.lower()
    return [n for n in _NOTES if q in n["title"].lower() or q in n["body"].lower()]


@server.tool()
def add_note(title: str, body: str) -> dict[str, Any]:
    """Add a note; returns how many notes there are now."""
    _NOTES.append({"title": title, "body": body})
    return {"added": title, "count": len(_NOTES)}


def main(argv: list[str]) -> None:
    if len(argv) >= 2 and argv[0] == "--http":
        host, _, port = argv[1].rpartition(":")
        server.run("streamable-http", host=host or "127.0.0.1", port=int(port),
                   stateless_http=True)
    else:
        server.run("stdio")


if __name__ == "__main__":
    main(sys.argv[1:])
