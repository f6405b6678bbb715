"""Circuit breakers around external tools (A2A agents, side-effecting integrations).

One breaker per tool, named ``tool:<name>``, in the process-wide registry shared with
the model breakers (`jetmesh.agents.models.breaker.BREAKERS`). A tool call that times
out or raises counts as a failure; N in a row open the breaker and further calls are
refused with a denial the model (or the step) sees, without touching the tool, until a
single probe call succeeds.

Two ways to use it:

* From a `StepGuard`: `ToolBreakers.before_call` in ``before_tool_call`` (returns the
  denial text while the breaker is open) and `ToolBreakers.after_call` once the tool
  returned (records success or failure).
* Without any loop hook: `guard_spec` / `guard_tool` wrap the tools themselves, so
  `Tool.invoke` checks and records the breaker.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .models.breaker import BREAKERS, BreakerRegistry, CircuitBreaker, Ticket
from .models.types import Model
from .spec import AgentSpec
from .tools import Tool, ToolContext, ToolResult

__all__ = [
    "BREAKER_DENIAL_PREFIX",
    "BreakerTool",
    "ToolBreakers",
    "guard_spec",
    "guard_tool",
    "guard_tools",
    "is_external_tool",
    "tool_breaker_name",
    "worker_breaker_states",
]

BREAKER_DENIAL_PREFIX = "circuit open:"
"""Every denial from a tool breaker starts with this (so runtimes can tell it from a
policy denial, e.g. to make a direct step retryable)."""

FAILURE_KINDS = frozenset({"timeout", "exception"})
"""`ToolResult.kind` values that count as a failure of the tool's far side. Invalid
arguments are the model's fault and invalid output a contract problem; policy denials
never reached the tool."""


def is_external_tool(tool: Tool) -> bool:
    """Tools that get a breaker by default: those with side effects (they talk to the
    outside world) and A2A bridges (``a2a:...``)."""
    return tool.side_effects or tool.name.startswith("a2a:")


def tool_breaker_name(tool: Tool | str) -> str:
    """``tool:<name>``."""
    return f"tool:{tool if isinstance(tool, str) else tool.name}"


def _denial(breaker: CircuitBreaker, tool_name: str) -> str:
    wait = breaker.retry_in_s()
    if breaker.current == "half_open":
        why = "a probe call to it is still running"
    else:
        why = (f"it failed {breaker.failure_threshold} times in a row; the next attempt is "
               f"allowed in {wait:.0f}s")
    return (f"{BREAKER_DENIAL_PREFIX} tool {tool_name!r} is temporarily unavailable ({why}). "
            "The call was not made; do not retry it now.")


def _record(breaker: CircuitBreaker, ticket: Ticket, result: ToolResult) -> None:
    if result.ok:
        breaker.success(ticket)
    elif result.kind in FAILURE_KINDS:
        breaker.failure(ticket)
    else:
        breaker.ignore(ticket)


@dataclass
class ToolBreakers:
    """Breaker checks for the tool calls of one step (create one per `StepGuard`).

    ``before_call`` returns None to let the call go ahead (and keeps its ticket under the
    call's idempotency key) or the denial text; exactly one of ``after_call`` /
    ``abandon`` must follow an allowed call with the same key.
    """

    registry: BreakerRegistry = field(default_factory=lambda: BREAKERS)
    applies: Callable[[Tool], bool] = is_external_tool
    """Which tools are guarded."""
    _tickets: dict[str, list[tuple[CircuitBreaker, Ticket]]] = field(
        default_factory=dict, init=False, repr=False)

    def before_call(self, tool: Tool, key: str = "") -> str | None:
        if not self.applies(tool):
            return None
        breaker = self.registry.get(tool_breaker_name(tool))
        ticket = breaker.acquire()
        if ticket is None:
            return _denial(breaker, tool.name)
        self._tickets.setdefault(key, []).append((breaker, ticket))
        return None

    def _pop(self, key: str) -> tuple[CircuitBreaker, Ticket] | None:
        held = self._tickets.get(key)
        if not held:
            return None
        entry = held.pop()
        if not held:
            del self._tickets[key]
        return entry

    def after_call(self, tool: Tool, result: ToolResult, key: str = "") -> None:
        """Record the outcome of a call `before_call` allowed (no-op for others)."""
        entry = self._pop(key)
        if entry is not None:
            _record(entry[0], entry[1], result)

    def abandon(self, key: str = "") -> None:
        """The allowed call never ran or was cancelled: free its ticket, record nothing."""
        entry = self._pop(key)
        if entry is not None:
            entry[0].ignore(entry[1])

    def abandon_all(self) -> None:
        """Free every ticket still held (call when the step ends, e.g. on cancellation)."""
        for key in list(self._tickets):
            while key in self._tickets:
                self.abandon(key)


@dataclass
class BreakerTool(Tool):
    """A `Tool` whose `invoke` goes through a circuit breaker (see `guard_tool`)."""

    inner: Tool | None = None
    breaker: CircuitBreaker | None = None

    async def invoke(self, arguments: Mapping[str, Any], ctx: ToolContext) -> ToolResult:
        inner = self.inner
        breaker = self.breaker
        if inner is None or breaker is None:  # pragma: no cover - built by guard_tool
            return await super().invoke(arguments, ctx)
        ticket = breaker.acquire()
        if ticket is None:
            return ToolResult(ok=False, error=_denial(breaker, self.name), kind="denied")
        try:
            result = await inner.invoke(arguments, ctx)
        except BaseException:
            breaker.ignore(ticket)
            raise
        _record(breaker, ticket, result)
        return result


def guard_tool(tool: Tool, breaker: CircuitBreaker | None = None, *,
               registry: BreakerRegistry | None = None) -> Tool:
    """``tool`` behind a breaker (default: ``tool:<name>`` from ``registry`` or
    `BREAKERS`). Same name, schema, risk and flags; `invoke` delegates to ``tool``."""
    if isinstance(tool, BreakerTool):
        return tool
    breaker = breaker or (registry or BREAKERS).get(tool_breaker_name(tool))
    kwargs = {f.name: getattr(tool, f.name) for f in dataclasses.fields(Tool) if f.init}
    return BreakerTool(**kwargs, inner=tool, breaker=breaker)


def guard_tools(tools: list[Tool], *, registry: BreakerRegistry | None = None,
                applies: Callable[[Tool], bool] = is_external_tool) -> list[Tool]:
    """The list with every tool ``applies`` selects wrapped by `guard_tool`."""
    return [guard_tool(t, registry=registry) if applies(t) else t for t in tools]


def guard_spec(spec: AgentSpec, *, registry: BreakerRegistry | None = None,
               applies: Callable[[Tool], bool] = is_external_tool) -> AgentSpec:
    """A copy of ``spec`` whose external tools (see `is_external_tool`) have breakers."""
    return dataclasses.replace(
        spec, tools=guard_tools(spec.tools, registry=registry, applies=applies))


def worker_breaker_states(spec: AgentSpec, model: Model | None = None, *,
                          registry: BreakerRegistry | None = None) -> dict[str, dict[str, Any]]:
    """The breakers one agent depends on, for its presence value: those in front of its
    model chain and those of its own tools (not other agents' in the same process)."""
    registry = registry or BREAKERS
    names = [tool_breaker_name(t) for t in spec.tools]
    get = getattr(model, "breaker_states", None)
    own: dict[str, dict[str, Any]] = dict(get()) if callable(get) else {}
    return {**own, **registry.states(names)}
