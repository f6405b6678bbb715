"""MCP servers as agent-spec data: how to reach one, and how far to trust its tools.

Pure pydantic, no SDK import: an `AgentSpec` lists these in ``mcp_servers`` and the worker
runtime (`jetmesh.agents.mcp.toolset`) turns them into jetmesh tools when it starts.

    McpServerConfig(
        name="files",
        transport=StdioServer(command="python", args=["-m", "my_mcp_server"]),
        read_only=["read_*", "list_*"],
        irreversible=["delete_*"],
    )
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = [
    "SUPPORTED_PROTOCOL_VERSIONS",
    "ClientCredentials",
    "HttpServer",
    "McpServerConfig",
    "StdioServer",
]

SUPPORTED_PROTOCOL_VERSIONS = ("2026-07-28",)
"""The MCP revisions jetmesh speaks to servers and as a server (stateless, with
``server/discover`` and cache hints). The SDK (``mcp`` 2.x) falls back to the 2025
initialize handshake for older servers when it probes; jetmesh tests only these."""

_NAME = r"^[a-z][a-z0-9_]{0,23}$"


class StdioServer(BaseModel):
    """A server jetmesh starts as a subprocess and talks to over stdin/stdout."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["stdio"] = "stdio"
    command: str
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    """Merged over the SDK's safe default environment (PATH, HOME, ...)."""
    cwd: str | None = None


class ClientCredentials(BaseModel):
    """OAuth 2.0 client credentials grant (RFC 6749 section 4.4) against ``token_url``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    token_url: str
    client_id: str
    client_secret: SecretStr
    scope: str | None = None


class HttpServer(BaseModel):
    """A streamable-HTTP server. One credential source at most; on a 401 it is asked
    again once (re-read from the environment or the file, or a new OAuth token) and
    the request resent; a second 401 is a clear error, never a retry loop."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["http"] = "http"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    bearer_token: SecretStr | None = None
    bearer_token_env: str | None = None
    """Name of an environment variable holding the token (read at each refresh)."""
    bearer_token_file: Path | None = None
    """A file holding the token (rotated by something else; read at each refresh)."""
    oauth: ClientCredentials | None = None

    def read_token(self) -> str | None:
        """The static or re-readable token, if one is configured (not OAuth)."""
        if self.bearer_token_file is not None:
            return self.bearer_token_file.read_text().strip() or None
        if self.bearer_token_env is not None:
            return os.environ.get(self.bearer_token_env) or None
        return self.bearer_token.get_secret_value() if self.bearer_token else None


Transport = Annotated[StdioServer | HttpServer, Field(discriminator="type")]


class McpServerConfig(BaseModel):
    """One MCP server an agent uses, and the rules for its tools.

    Risk: a tool is ``irreversible`` if it matches ``irreversible`` or the server marks
    it destructive (an annotation that raises the risk is always believed), ``read`` if
    it matches ``read_only`` or (with ``trust_annotations``) the server marks it
    read-only, and ``write`` otherwise, so the policy gates apply to it like to any
    side-effecting native tool.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=_NAME)
    """Short id; the agent sees the server's tools as ``<name>__<tool>``."""
    transport: Transport
    tools: list[str] | None = None
    """Only these tools (names or globs); None: every tool the server lists."""
    read_only: list[str] = Field(default_factory=list)
    irreversible: list[str] = Field(default_factory=list)
    trust_annotations: bool = False
    """Believe the server's ``readOnlyHint`` (lowers the risk to ``read``)."""
    on_drift: Literal["refuse", "accept"] = "refuse"
    """When the tool list changes after the agent started: ``refuse`` keeps the list it
    started with and denies calls to this server until the agent restarts; ``accept``
    takes the new list from the next step on. Either way an event is recorded."""
    timeout_s: float = Field(default=30.0, gt=0)
    """Per call; a slower call fails (and the connection is restarted)."""
    connect_timeout_s: float = Field(default=20.0, gt=0)
    """To connect (a stdio server's process start included)."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts after a transient failure, for read-only tools only."""
    backoff_s: float = Field(default=0.2, ge=0)
    """First pause between attempts, doubled each time."""
    max_retry_after_s: float = Field(default=30.0, ge=0)
    """The longest 429 Retry-After honoured; a longer one fails the call at once."""
    rate_limit_retries: int = Field(default=3, ge=0)
    """429 answers waited out per request before the call fails."""
    breaker_threshold: int = Field(default=3, ge=1)
    """Consecutive failures that open the server's breaker."""
    breaker_reset_s: float = Field(default=30.0, gt=0)
    """How long the breaker stays open before one probe call is let through."""
    untrusted_output: bool = True
    """Show results to the model as untrusted data (the default; third-party text)."""

    def selects(self, tool: str) -> bool:
        return self.tools is None or any(fnmatch.fnmatchcase(tool, p) for p in self.tools)

    def tool_name(self, tool: str) -> str:
        """The jetmesh name of one of the server's tools."""
        return f"{self.name}__{tool}"
