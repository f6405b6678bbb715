"""The MCP package's exception tree (all raised by `McpConnection`, turned into failed
tool results by `McpTool.invoke`; none leaves a step)::

    McpError                    server, message
    ├── McpUnavailable          the server could not be reached or dropped the
    │                           connection (transient: read-only calls retry)
    ├── McpTimeout              the call did not answer within timeout_s (transient)
    ├── McpRateLimited          429 with a Retry-After longer than allowed, or too many
    │                           429s in a row
    ├── McpAuthFailed           401 again after one credential refresh (not retried)
    └── McpProtocolError        the server answered with a JSON-RPC error
"""

from __future__ import annotations

from jetmesh.bus.errors import JetmeshError

__all__ = [
    "McpAuthFailed",
    "McpError",
    "McpProtocolError",
    "McpRateLimited",
    "McpTimeout",
    "McpUnavailable",
]


class McpError(JetmeshError):
    """Base of every MCP client failure."""

    transient = False
    """Another attempt may succeed (read-only tools retry these)."""

    def __init__(self, server: str, message: str) -> None:
        super().__init__(f"MCP server {server!r}: {message}")
        self.server = server
        self.message = message


class McpUnavailable(McpError):
    transient = True


class McpTimeout(McpError):
    transient = True


class McpRateLimited(McpError):
    pass


class McpAuthFailed(McpError):
    pass


class McpProtocolError(McpError):
    def __init__(self, server: str, message: str, code: int | None = None) -> None:
        super().__init__(server, message)
        self.code = code
