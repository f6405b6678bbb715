"""jetmesh.agents.mcp: MCP servers' tools as durable, recorded, policy-gated jetmesh
tools. (The mesh itself as an MCP server is an edge like the A2A gateway:
`jetmesh.a2a.mcp_server`.)

Importing this package loads only the configuration (pure data); the SDK (``mcp`` 2.x,
MCP revision 2026-07-28) is imported by `toolset` and `connection`.
"""

from __future__ import annotations

from .config import (
    SUPPORTED_PROTOCOL_VERSIONS,
    ClientCredentials,
    HttpServer,
    McpServerConfig,
    StdioServer,
)

__all__ = [
    "SUPPORTED_PROTOCOL_VERSIONS",
    "ClientCredentials",
    "HttpServer",
    "McpServerConfig",
    "StdioServer",
]
