"""jetmesh.agents.mcp: MCP servers' tools as durable, recorded, policy-gated jetmesh
tools, and the mesh itself as an MCP server.

Importing this package loads only the configuration (pure data); the SDK (``mcp`` 2.x,
MCP revision 2026-07-28) is imported by `toolset`, `connection` and `serve`.
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
