"""Circuit breakers for model providers and external tools: the one breaker module.

A `CircuitBreaker` is a small, synchronous state machine with an injectable clock::

    closed ──N consecutive failures──▶ open ──reset_timeout_s──▶ half_open
      ▲                                 ▲                          │
      └──────── probe succeeds ─────────┼──── probe fails ─────────┘

* closed: every call goes through; a success resets the failure count.
* open: every call is rejected at once (no call is made) until ``reset_timeout_s``
  has passed since it opened.
* half_open: exactly one call (the probe) goes through; other callers are rejected while
  it runs. Its success closes the breaker, its failure re-opens it for another
  ``reset_timeout_s``.

Only transient failures count (`is_transient`: 5xx, 429, timeouts, lost connections,
retries exhausted). Errors that say the request or the key is wrong are not the
provider's fault: they neither count nor reset the count. Results of calls that started
before the breaker last changed state are ignored (they say nothing about the present).

`BreakerModel` applies a breaker around a `Model`; `guard_tool` / `guard_spec` put one in
front of a tool (`BreakerTool`: its `invoke` checks and records the breaker). Breakers
live in a `BreakerRegistry` keyed by name (``anthropic``, ``openai``, ``tool:<name>``);
`BREAKERS` is the one shared by the whole process and `breaker_states()` reports it (for
presence / `jetmesh agents`).

Tools: one breaker per tool, named ``tool:<name>``. A tool call that times out or raises
counts as a failure; N in a row open the breaker and further calls are refused with a
denial the model (or the step) sees, without touching the tool, until a single probe
call succeeds. Invalid arguments (the model's fault), invalid output and policy denials
count for nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from jetmesh.agents.models.errors import (
    ModelCircuitOpen,
    ModelRetriesExhausted,
    ModelTransientError,
)
from jetmesh.agents.models.types import Model, ModelRequest, ModelResponse
from jetmesh.agents.tools import Tool, ToolContext, ToolResult

if TYPE_CHECKING:
    from jetmesh.agents.spec import AgentSpec

__all__ = [
    "BREAKERS",
    "BREAKER_DENIAL_PREFIX",
    "BreakerModel",
    "BreakerRegistry",
    "BreakerSettings",
    "BreakerState",
    "BreakerTool",
    "CircuitBreaker",
    "Ticket",
    "breaker_states",
    "describe_breakers",
    "guard_spec",
    "guard_tool",
    "guard_tools",
    "is_external_tool",
    "is_transient",
    "tool_breaker_name",
    "worker_breaker_states",
]

log = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]


def is_transient(exc: BaseException) -> bool:
    """True for failures that say the provider is unwell: transient model errors (5xx,
    429, timeouts, connection), exhausted retries, and bare timeouts/connection errors.

    `ModelCircuitOpen` is transient for callers (try later, or another model) but
    `CircuitBreaker` never counts it as a failure of its own.
    """
    return isinstance(
        exc, ModelTransientError | ModelRetriesExhausted | TimeoutError | ConnectionError
    )


class BreakerSettings(BaseSettings):
    """Breaker defaults, read from the environment."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    failure_threshold: int = Field(
        5, ge=1, validation_alias=AliasChoices("JETMESH_BREAKER_FAILURES", "failure_threshold")
    )
    """Consecutive transient failures that open a breaker."""
    reset_timeout_s: float = Field(
        30.0, gt=0, validation_alias=AliasChoices("JETMESH_BREAKER_RESET_S", "reset_timeout_s")
    )
    """How long an open breaker rejects calls before letting one probe through."""


@dataclass(frozen=True)
class Ticket:
    """Permission for one call, from `CircuitBreaker.acquire`; hand it back with exactly
    one of `success` / `failure` / `ignore`."""

    generation: int
    """The breaker's state generation when the call started."""
    probe: bool
    """This call is the half-open probe."""


class CircuitBreaker:
    """One breaker. Thread-safe; never blocks (no I/O, no awaits)."""

    def __init__(
        self,
        name: str,
        *,
        failure_threshold: int = 5,
        reset_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be positive")
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        """Drives the timing (monotonic by default)."""
        self._wall = wall_clock
        """Only for the timestamps `state()` reports."""
        self._lock = threading.Lock()
        self._state: BreakerState = "closed"
        self._failures = 0
        self._opened_at: float | None = None
        self._generation = 0
        self._probe_running = False
        self.rejected = 0
        """Calls rejected since the process started (for display)."""

    # --- state machine --------------------------------------------------------------

    def _refresh(self) -> None:
        if (self._state == "open" and self._opened_at is not None
                and self._clock() >= self._opened_at + self.reset_timeout_s):
            self._transition("half_open")

    def _transition(self, state: BreakerState) -> None:
        previous = self._state
        self._state = state
        self._generation += 1
        self._probe_running = False
        if state == "open":
            self._opened_at = self._clock()
        elif state == "closed":
            self._opened_at = None
            self._failures = 0
        if previous != state:
            log.log(logging.WARNING if state == "open" else logging.INFO,
                    "circuit breaker %s: %s -> %s (%d consecutive failures)",
                    self.name, previous, state, self._failures)

    def acquire(self) -> Ticket | None:
        """A ticket when a call may go ahead now; None when it must be rejected."""
        with self._lock:
            self._refresh()
            if self._state == "closed":
                return Ticket(self._generation, probe=False)
            if self._state == "half_open" and not self._probe_running:
                self._probe_running = True
                return Ticket(self._generation, probe=True)
            self.rejected += 1
            return None

    def success(self, ticket: Ticket) -> None:
        """The call went through and the other side answered."""
        with self._lock:
            if ticket.generation != self._generation:
                return
            if self._state == "closed":
                self._failures = 0
            elif ticket.probe:
                self._transition("closed")

    def failure(self, ticket: Ticket) -> None:
        """The call failed transiently (see `is_transient`)."""
        with self._lock:
            if ticket.generation != self._generation:
                return
            self._failures += 1
            if self._state == "closed":
                if self._failures >= self.failure_threshold:
                    self._transition("open")
            elif ticket.probe:
                self._transition("open")

    def ignore(self, ticket: Ticket) -> None:
        """The call ended in a way that says nothing about the other side's health (an
        invalid request, a bad key, cancellation). A probe's slot is freed for the next
        caller; the failure count is unchanged."""
        with self._lock:
            if ticket.generation == self._generation and ticket.probe:
                self._probe_running = False

    def reset(self) -> None:
        """Close the breaker and forget its failures (operators, tests)."""
        with self._lock:
            self._transition("closed")

    # --- reporting ------------------------------------------------------------------

    @property
    def current(self) -> BreakerState:
        """The state now (an open breaker past its timeout reads as half_open)."""
        with self._lock:
            self._refresh()
            return self._state

    def retry_in_s(self) -> float:
        """Seconds until a call may be let through: 0 when closed or a probe slot is free;
        the time to the next probe when open; ``reset_timeout_s`` while a probe runs."""
        with self._lock:
            self._refresh()
            if self._state == "open" and self._opened_at is not None:
                return max(0.0, self._opened_at + self.reset_timeout_s - self._clock())
            if self._state == "half_open" and self._probe_running:
                return self.reset_timeout_s
            return 0.0

    def _iso(self, t: float | None) -> str | None:
        if t is None:
            return None
        wall = self._wall() - (self._clock() - t)
        return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")

    def state(self) -> dict[str, Any]:
        """JSON-ready: state, consecutive_failures, threshold, opened_at and
        next_probe_at (ISO-8601 UTC, or None when closed), rejected."""
        with self._lock:
            self._refresh()
            opened = self._opened_at
            return {
                "state": self._state,
                "consecutive_failures": self._failures,
                "threshold": self.failure_threshold,
                "opened_at": self._iso(opened),
                "next_probe_at": (self._iso(opened + self.reset_timeout_s)
                                  if opened is not None and self._state == "open" else None),
                "rejected": self.rejected,
            }

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self.current!r})"


class BreakerRegistry:
    """Breakers by name, created on first use with the registry's defaults."""

    def __init__(
        self,
        *,
        failure_threshold: int | None = None,
        reset_timeout_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._threshold = failure_threshold
        self._reset = reset_timeout_s
        self._clock = clock
        self._wall = wall_clock
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        """The breaker called ``name`` (``anthropic``, ``openai``, ``tool:<name>``)."""
        with self._lock:
            breaker = self._breakers.get(name)
            if breaker is None:
                threshold, reset = self._threshold, self._reset
                if threshold is None or reset is None:
                    settings = BreakerSettings()
                    threshold = self._threshold = threshold or settings.failure_threshold
                    reset = self._reset = reset or settings.reset_timeout_s
                breaker = CircuitBreaker(
                    name, failure_threshold=threshold, reset_timeout_s=reset,
                    clock=self._clock, wall_clock=self._wall)
                self._breakers[name] = breaker
            return breaker

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._breakers)

    def states(self, names: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """``{name: breaker.state()}`` for every breaker (or just ``names``, if they exist)."""
        with self._lock:
            chosen = [b for n, b in sorted(self._breakers.items())
                      if names is None or n in names]
        return {b.name: b.state() for b in chosen}

    def clear(self) -> None:
        """Forget every breaker (tests)."""
        with self._lock:
            self._breakers.clear()


BREAKERS = BreakerRegistry()
"""The process-wide registry shared by every worker, model chain and tool guard."""


def breaker_states() -> dict[str, dict[str, Any]]:
    """States of every breaker in this process, for presence and `jetmesh agents`."""
    return BREAKERS.states()


def describe_breakers(states: Mapping[str, Mapping[str, Any]]) -> str:
    """One short line for a table cell: the breakers that are not closed, e.g.
    ``anthropic open (5/5), tool:a2a:http://x#y half_open``; ``ok`` when all are closed,
    ``-`` when there are none."""
    if not states:
        return "-"
    parts = []
    for name, s in sorted(states.items()):
        state = s.get("state", "?")
        if state == "closed":
            continue
        part = f"{name} {state}"
        if state == "open":
            part += f" ({s.get('consecutive_failures', '?')}/{s.get('threshold', '?')})"
        parts.append(part)
    return ", ".join(parts) or "ok"


class BreakerModel:
    """A `Model` behind a circuit breaker.

    While the breaker is open, `complete` raises `ModelCircuitOpen` without calling the
    model. Transient failures (see `is_transient`) count; successes close a half-open
    breaker; other errors and cancellation count for nothing.
    """

    def __init__(self, model: Model, breaker: CircuitBreaker) -> None:
        self.inner = model
        self.breaker = breaker
        self.provider = model.provider
        self.name = model.name

    async def complete(self, request: ModelRequest) -> ModelResponse:
        ticket = self.breaker.acquire()
        if ticket is None:
            raise self._open_error()
        try:
            response = await self.inner.complete(request)
        except BaseException as exc:
            if is_transient(exc) and not isinstance(exc, ModelCircuitOpen):
                self.breaker.failure(ticket)
            else:
                self.breaker.ignore(ticket)
            raise
        self.breaker.success(ticket)
        return response

    def _open_error(self) -> ModelCircuitOpen:
        wait = self.breaker.retry_in_s()
        if self.breaker.current == "half_open":
            why = "is half-open and its probe call is still running"
        else:
            why = (f"is open after {self.breaker.failure_threshold} consecutive transient "
                   f"failures; next probe in {wait:.1f}s")
        return ModelCircuitOpen(
            self.provider, self.name,
            f"circuit breaker {self.breaker.name!r} {why}; the model was not called",
            breaker=self.breaker.name, retry_after=wait)

    def breaker_states(self) -> dict[str, dict[str, Any]]:
        return {self.breaker.name: self.breaker.state()}

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"BreakerModel({self.provider}/{self.name}, breaker={self.breaker.name!r})"


# --- tools --------------------------------------------------------------------------

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
