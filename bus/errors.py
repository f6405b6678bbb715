"""Bus errors, and `JetmeshError`: the one root of every jetmesh exception.

Each package keeps its own tree in its ``errors.py``; every tree's root derives from
`JetmeshError`, so a program (and the CLI) can catch everything jetmesh raises at once::

    JetmeshError
    ├── BusError                jetmesh.bus.errors (below)
    ├── AgentError              jetmesh.agents.errors: specs, tools, step controls
    ├── ModelError              jetmesh.agents.models.errors: model calls
    ├── McpError                jetmesh.agents.mcp.errors: MCP servers
    ├── OrchestratorError       jetmesh.orchestrator.errors: workflows, plans, inputs
    ├── MeshA2AError            jetmesh.a2a.errors: cards, keys, external agents
    └── MemoryStoreError        jetmesh.memory.errors: the memory store and service

Classes that were also a builtin error (``KeyError``, ``ValueError``) still are, so
existing ``except`` clauses keep catching them.

    BusError
    ├── NotConnectedError       no server reachable at the configured URL
    ├── ServerStartError        the embedded nats-server did not come up
    ├── StreamConfigConflict    a declared stream/consumer differs and could not be updated
    ├── InvalidEventError       an event failed validation and was not appended
    ├── WireError               bytes refused at the edge (bus.wire.check_json), with why
    ├── AppendConflict          expected-sequence append lost the race (stale writer)
    ├── LedgerReadError         reading a task's events failed
    └── BudgetRefused           a reservation would overrun a task's budget (bus.budgets)
"""

from __future__ import annotations

from typing import Any


class JetmeshError(Exception):
    """Base of every exception jetmesh raises on purpose (see the tree above)."""


class BusError(JetmeshError):
    """Base of every bus error."""


class NotConnectedError(BusError):
    def __init__(self, url: str, cause: BaseException | None = None) -> None:
        self.url = url
        super().__init__(f"cannot reach NATS at {url}: {cause}")


class ServerStartError(BusError):
    def __init__(self, message: str, log_tail: str = "") -> None:
        self.log_tail = log_tail
        super().__init__(message + (f"\n--- nats-server log ---\n{log_tail}" if log_tail else ""))


class StreamConfigConflict(BusError):
    def __init__(self, name: str, detail: str) -> None:
        self.name = name
        self.detail = detail
        super().__init__(f"{name}: {detail}")


class InvalidEventError(BusError):
    """Raised before anything is written; `errors` are pydantic's structured errors."""

    def __init__(self, reason: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.reason = reason
        self.errors = errors or []
        super().__init__(reason)


class WireError(BusError, ValueError):
    """Bytes refused at the edge (bus.wire); `reason` says why (safe to log and store)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class AppendConflict(BusError):
    """Another writer appended to the subject since `expected_seq` (we are fenced out)."""

    def __init__(self, subject: str, expected_seq: int, detail: str = "") -> None:
        self.subject = subject
        self.expected_seq = expected_seq
        super().__init__(f"append to {subject} expected last seq {expected_seq}: {detail}")


class LedgerReadError(BusError):
    pass


class LedgerWriteError(BusError):
    """The ledger refused an append for a reason other than a fence (see AppendConflict)."""
