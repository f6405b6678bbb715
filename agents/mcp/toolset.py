"""An agent's MCP servers as jetmesh tools: listed once when the worker starts, pinned by
a hash, checked for drift before each step.

Each server tool becomes an `McpTool` named ``<server>__<tool>`` with the server's input
schema (checked here, before anything is sent), a risk level from the configuration
(`McpServerConfig`: ``write`` unless configured or trusted otherwise, so the policy gates
and approvals apply), untrusted-data output, and the server's resilience around each
call: its circuit breaker, its timeout, retries with backoff for read-only tools only.
The step loop records every call in the ledger and replays it on redelivery like any
native tool's. The agent's tools are sorted by name, so the set offered to a model is
the same on every step (provider prompt caches stay warm).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mcp.types import CallToolResult, TextContent
from mcp.types import Tool as McpToolInfo
from pydantic import BaseModel, ConfigDict

from jetmesh.agents.breakers import CircuitBreaker
from jetmesh.agents.spec import AgentSpec, schema_errors
from jetmesh.agents.tools import Risk, Tool, ToolContext, ToolResult, untrusted_block
from jetmesh.bus import tracing
from jetmesh.bus.events import McpToolsChangedData

from .config import McpServerConfig
from .connection import McpConnection
from .errors import McpError, McpTimeout

__all__ = [
    "McpTool",
    "McpToolset",
    "ServerTools",
    "risk_of",
    "tool_list_hash",
]

log = logging.getLogger("jetmesh.mcp")

DRIFT_CHECK_TIMEOUT_S = 5.0
"""The longest a step waits for a server's tool list before it starts (a slow server's
list is checked again before the next step)."""

IDEMPOTENCY_META_KEY = "io.jetmesh/idempotency-key"
"""The `_meta` key carrying a call's idempotency key to the server (a server that
honours it makes a redelivered write exactly-once)."""


class McpArguments(BaseModel):
    """Placeholder input model: an MCP tool's arguments are checked against the
    server's JSON Schema (`Tool.input_schema`), not a pydantic model."""

    model_config = ConfigDict(extra="allow")


class McpOutput(BaseModel):
    """What an MCP tool call returns to the step: the text blocks joined, the
    structured content when the server gives one, other blocks as they came."""

    model_config = ConfigDict(extra="forbid")

    text: str = ""
    structured: dict[str, Any] | None = None
    other: list[dict[str, Any]] | None = None


def _unused(args: McpArguments) -> None:  # McpTool.invoke never calls fn
    raise NotImplementedError


def risk_of(config: McpServerConfig, info: McpToolInfo) -> Risk:
    """A tool's risk (see `McpServerConfig`)."""
    ann = info.annotations

    def listed(patterns: list[str]) -> bool:
        return any(fnmatch.fnmatchcase(info.name, p) for p in patterns)

    if listed(config.irreversible) or (ann is not None and ann.destructive_hint is True):
        return "irreversible"
    if listed(config.read_only):
        return "read"
    if config.trust_annotations and ann is not None and ann.read_only_hint is True:
        return "read"
    return "write"


def _canonical(info: McpToolInfo) -> dict[str, Any]:
    return info.model_dump(mode="json", by_alias=True, exclude_none=True,
                           include={"name", "title", "description", "input_schema",
                                    "output_schema", "annotations"})


def tool_list_hash(infos: list[McpToolInfo]) -> str:
    """sha256 (hex) of the canonical JSON of the tools (name, description, schemas,
    annotations), in name order: what an agent pins when it starts."""
    body = json.dumps(sorted((_canonical(i) for i in infos), key=lambda d: d["name"]),
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def _output(result: CallToolResult) -> McpOutput:
    texts: list[str] = []
    other: list[dict[str, Any]] = []
    for block in result.content:
        if isinstance(block, TextContent):
            texts.append(block.text)
        else:
            other.append(block.model_dump(mode="json", by_alias=True, exclude_none=True))
    return McpOutput(text="\n".join(texts), structured=result.structured_content,
                     other=other or None)


@dataclass
class ServerTools:
    """One server's pinned tool list and state."""

    config: McpServerConfig
    connection: McpConnection
    infos: list[McpToolInfo]
    hash: str
    refusal: str | None = None
    """Set when the list drifted and the configuration refuses it: calls are denied."""
    drift: McpToolsChangedData | None = None
    """The refused drift, recorded again on every step it affects."""

    @property
    def breaker(self) -> CircuitBreaker:
        return self.connection.breaker


@dataclass
class McpTool(Tool):
    """One MCP server tool as a jetmesh tool (see the module docstring)."""

    server: ServerTools | None = None
    remote_name: str = ""

    async def invoke(self, arguments: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
        start = time.perf_counter()
        server = self.server
        assert server is not None, "built by McpToolset"

        def failed(kind: Any, error: str) -> ToolResult:
            return ToolResult(ok=False, error=error, kind=kind,
                              latency_ms=(time.perf_counter() - start) * 1000)

        if server.refusal is not None:
            return failed("denied", server.refusal)
        args = dict(arguments)
        errors = schema_errors(self.input_schema or {"type": "object"}, args)
        if errors:
            return failed("invalid_arguments",
                          f"invalid arguments for tool {self.name!r}; fix each and try again:\n"
                          + "\n".join(f"- {e}" for e in errors))
        config, breaker = server.config, server.breaker
        attempts = 1 + (config.retries if self.risk == "read" else 0)
        meta = {IDEMPOTENCY_META_KEY: ctx.idempotency_key} if ctx.idempotency_key else None
        error: McpError | None = None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(config.backoff_s * 2 ** (attempt - 1))
            ticket = breaker.acquire()
            if ticket is None:
                return failed("denied", (
                    f"circuit open: MCP server {config.name!r} is temporarily unavailable "
                    f"(it failed {breaker.failure_threshold} times in a row; the next "
                    f"attempt is allowed in {breaker.retry_in_s():.0f}s). The call was not "
                    "made; do not retry it now."))
            try:
                # The SDK puts the current context in the request's `_meta`
                # (traceparent): this call's own span, so the server's nest under it.
                with tracing.attached(ctx.traceparent):
                    result = await server.connection.call_tool(self.remote_name, args,
                                                               meta=meta)
            except McpError as e:
                (breaker.failure if e.transient else breaker.ignore)(ticket)
                error = e
                if e.transient and attempt + 1 < attempts:
                    continue
                break
            except BaseException:
                breaker.ignore(ticket)
                raise
            breaker.success(ticket)
            out = _output(result)
            if result.is_error:
                return failed(None, f"tool {self.name!r} reported an error:\n"
                              + untrusted_block(f"mcp:{config.name}", out.text))
            return ToolResult(ok=True, output=out.model_dump(mode="json", exclude_none=True),
                              latency_ms=(time.perf_counter() - start) * 1000)
        assert error is not None
        tried = f" after {attempts} attempts" if attempts > 1 else ""
        if self.risk != "read" and error.transient:
            tried += " (not retried: a write may already have taken effect)"
        return failed("timeout" if isinstance(error, McpTimeout) else "exception",
                      f"tool {self.name!r} failed{tried}: {error}")


def _build_tools(server: ServerTools) -> list[McpTool]:
    config = server.config
    tools = []
    for info in server.infos:
        risk = risk_of(config, info)
        tools.append(McpTool(
            name=config.tool_name(info.name),
            description=info.description or info.title or info.name,
            input_model=McpArguments, output_model=McpOutput, fn=_unused,
            side_effects=risk != "read", risk=risk,
            timeout_s=config.timeout_s * (1 + config.retries) + 5,
            untrusted_output=config.untrusted_output,
            input_schema=dict(info.input_schema),
            server=server, remote_name=info.name))
    return tools


def _diff(old: list[McpToolInfo], new: list[McpToolInfo]) -> tuple[list[str], ...]:
    a = {i.name: _canonical(i) for i in old}
    b = {i.name: _canonical(i) for i in new}
    return (sorted(set(b) - set(a)), sorted(set(a) - set(b)),
            sorted(n for n in set(a) & set(b) if a[n] != b[n]))


@dataclass
class McpToolset:
    """An agent's MCP servers, connected, with their pinned tool lists."""

    agent: str
    servers: dict[str, ServerTools] = field(default_factory=dict)
    _native: list[Tool] | None = field(default=None, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    _checking: asyncio.Future[tuple[list[McpToolsChangedData], bool]] | None = field(
        default=None, repr=False)

    @classmethod
    async def open(cls, spec: AgentSpec) -> McpToolset:
        """Connect to every server of ``spec`` and list its tools (raises `McpError` when
        a server cannot be reached: an agent does not start without its tools)."""
        toolset = cls(spec.name)
        try:
            for config in spec.mcp_servers:
                connection = McpConnection(config)
                toolset.servers[config.name] = ServerTools(config, connection, [], "")
                infos = await toolset._listed(toolset.servers[config.name])
                toolset.servers[config.name].infos = infos
                toolset.servers[config.name].hash = tool_list_hash(infos)
                log.info("agent %s: MCP server %s lists %d tools, hash %s", spec.name,
                         config.name, len(infos), toolset.servers[config.name].hash[:12])
        except BaseException:
            await toolset.aclose()
            raise
        return toolset

    async def _listed(self, server: ServerTools, *, refresh: bool = False,
                      timeout_s: float | None = None) -> list[McpToolInfo]:
        infos = await server.connection.list_tools(refresh=refresh, timeout_s=timeout_s)
        return sorted((i for i in infos if server.config.selects(i.name)),
                      key=lambda i: i.name)

    def attach(self, spec: AgentSpec) -> AgentSpec:
        """``spec`` with the servers' current tools (replacing earlier ones), every tool
        sorted by name, and the pinned hashes."""
        if self._native is None:
            self._native = [t for t in spec.tools if not isinstance(t, McpTool)]
        tools = list(self._native)
        for server in self.servers.values():
            tools.extend(_build_tools(server))
        return dataclasses.replace(
            spec, tools=sorted(tools, key=lambda t: t.name),
            mcp_tool_hashes={n: s.hash for n, s in sorted(self.servers.items())})

    async def check_drift(self) -> tuple[list[McpToolsChangedData], bool]:
        """Before a step: each server's list (from the SDK's cache while its hint says it
        is fresh) against the pinned one. Returns the changes to record and whether the
        tools changed (an accepted drift: `attach` again). A server that cannot be
        listed now is left as it is (its calls will meet the breaker). Steps that start
        while a check is under way share its answer (one list per server, not one each)."""
        running = self._checking
        if running is not None and not running.done():
            return await asyncio.shield(running)
        self._checking = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._checking)

    async def _check(self) -> tuple[list[McpToolsChangedData], bool]:
        changes: list[McpToolsChangedData] = []
        accepted = False
        async with self._lock:
            for server in self.servers.values():
                if server.refusal is not None:
                    if server.drift is not None:
                        changes.append(server.drift)
                    continue
                if server.breaker.current == "open":
                    continue  # known to be down: no step waits on it here
                try:
                    infos = await self._listed(server, timeout_s=DRIFT_CHECK_TIMEOUT_S)
                except McpError as e:
                    log.info("agent %s: cannot list MCP server %s: %s", self.agent,
                             server.config.name, e)
                    continue
                current = tool_list_hash(infos)
                if current == server.hash:
                    continue
                added, removed, changed = _diff(server.infos, infos)
                action: Literal["refused", "accepted"] = (
                    "refused" if server.config.on_drift == "refuse" else "accepted")
                change = McpToolsChangedData(
                    agent=self.agent, server=server.config.name, pinned_hash=server.hash,
                    current_hash=current, added=added, removed=removed, changed=changed,
                    action=action)
                changes.append(change)
                log.warning("agent %s: MCP server %s changed its tools (+%s -%s ~%s): %s",
                            self.agent, server.config.name, added, removed, changed, action)
                if action == "refused":
                    server.refusal = (
                        f"MCP server {server.config.name!r} changed its tool list since the "
                        f"agent started (hash {server.hash[:12]} -> {current[:12]}; added "
                        f"{added}, removed {removed}, changed {changed}); the configuration "
                        "refuses a changed list (on_drift=refuse), so its tools are not "
                        "called until the agent restarts. Do not retry this call.")
                    server.drift = change
                else:
                    server.infos, server.hash = infos, current
                    accepted = True
        return changes, accepted

    def breaker_states(self) -> dict[str, dict[str, Any]]:
        return {s.breaker.name: s.breaker.state() for s in self.servers.values()}

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per server, for the presence value: pinned hash, tools, refusal."""
        return {name: {"hash": s.hash, "tools": [i.name for i in s.infos],
                       "refused": s.refusal is not None,
                       "connects": s.connection.connects}
                for name, s in sorted(self.servers.items())}

    async def aclose(self) -> None:
        for server in self.servers.values():
            await server.connection.aclose()
