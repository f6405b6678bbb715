"""Task budgets on a shared counter: reserve before a call, settle after, never overrun.

One KV entry per task in the `jm-budgets` bucket holds what the task has spent and what
is reserved by calls in flight. Every change is a compare-and-set on the entry's
revision, so replicas of any agent, on any machine, draw from the same budget: a call
whose upper-bound estimate does not fit in what is left is refused before it is made.

Trust: the counter is one key per task (`$KV.jm-budgets.<task>`) shared by every agent
of the task, so NATS permissions cannot keep an agent to its own task's counter (see
`LIMITS` in bus/permissions). Keys per agent slice (`<task>.<agent>`, writable only by
that agent) would need the orchestrator to split each budget into slices up front, and
give up drawing one budget across agents; not done. The ledger's ModelCalled events are
the record of what was spent, whatever a counter says.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jetmesh.bus import subjects
from jetmesh.bus.errors import BusError
from jetmesh.bus.events import Budget
from jetmesh.bus.presence import ensure_bucket

_C = TypeVar("_C", bound=BaseModel)


class BudgetUsage(BaseModel):
    # Written only as this model dumps it: a value with other fields is not a counter
    # (parsed leniently it would read as zero spent).
    model_config = ConfigDict(extra="forbid")

    spent_usd: float = 0.0
    spent_tokens: int = 0
    tool_calls: int = 0
    reserved: dict[str, tuple[float, int]] = Field(default_factory=dict)
    """Reservation id -> (usd, tokens) of calls in flight."""

    @property
    def reserved_usd(self) -> float:
        return sum(r[0] for r in self.reserved.values())

    @property
    def reserved_tokens(self) -> int:
        return sum(r[1] for r in self.reserved.values())


class BudgetRefused(BusError):
    """A reservation or count would overrun the task's budget: nothing was taken."""

    def __init__(self, kind: str, limit: float, would_be: float) -> None:
        self.kind, self.limit, self.would_be = kind, limit, would_be
        super().__init__(f"{kind} budget {limit:g} would be exceeded ({would_be:g})")


class CounterUnreadable(BudgetRefused):
    """A stored counter that does not parse (another writer, a bad upgrade): spending
    against it is refused, not started again from zero (that would forget the spend)."""

    def __init__(self, key: str, error: Exception) -> None:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        BusError.__init__(self, f"spend counter {key} is not readable ({first}): spending "
                                "is refused until an operator removes or fixes it")
        self.kind, self.limit, self.would_be = "unreadable_counter", 0.0, 0.0


def parse_counter(model: type[_C], key: str, value: bytes | None) -> _C:
    try:
        return model.model_validate_json(value or b"{}")
    except ValidationError as e:
        raise CounterUnreadable(key, e) from e


@dataclass(frozen=True)
class Reservation:
    task_id: str
    id: str
    usd: float
    tokens: int


def check(budget: Budget, usage: BudgetUsage, usd: float, tokens: int, tool_calls: int) -> None:
    """Pure: raise BudgetRefused when adding this to spent + reserved would overrun."""
    if budget.max_usd is not None and usd:
        total = usage.spent_usd + usage.reserved_usd + usd
        if total > budget.max_usd + 1e-12:
            raise BudgetRefused("usd", budget.max_usd, total)
    if budget.max_tokens is not None and tokens:
        total_t = usage.spent_tokens + usage.reserved_tokens + tokens
        if total_t > budget.max_tokens:
            raise BudgetRefused("tokens", budget.max_tokens, total_t)
    if budget.max_tool_calls is not None and tool_calls:
        total_c = usage.tool_calls + tool_calls
        if total_c > budget.max_tool_calls:
            raise BudgetRefused("tool_calls", budget.max_tool_calls, total_c)


class Budgets(Protocol):
    """The budget book port: the task counters every call draws from. `BudgetBook` (NATS
    KV, shared by every process of the mesh) is the real one, `InMemoryBudgetBook` (one
    process) the stand-in for tests."""

    async def usage(self, task_id: str) -> BudgetUsage: ...

    async def reserve(self, task_id: str, budget: Budget, *, usd: float = 0.0,
                      tokens: int = 0) -> Reservation: ...

    async def settle(self, res: Reservation, *, usd: float, tokens: int) -> BudgetUsage: ...

    async def release(self, res: Reservation) -> None: ...

    async def count_tool_call(self, task_id: str, budget: Budget) -> None: ...


class _Book:
    """Reserve / settle / release / count on a counter store (`_update`: change one
    task's counter atomically)."""

    async def _update(self, task_id: str, change: Callable[[BudgetUsage], None]
                      ) -> BudgetUsage:
        raise NotImplementedError

    async def reserve(self, task_id: str, budget: Budget, *, usd: float = 0.0, tokens: int = 0
                      ) -> Reservation:
        res = Reservation(task_id, uuid.uuid4().hex, usd, tokens)

        def change(u: BudgetUsage) -> None:
            check(budget, u, usd, tokens, 0)
            u.reserved[res.id] = (usd, tokens)

        await self._update(task_id, change)
        return res

    async def settle(self, res: Reservation, *, usd: float, tokens: int) -> BudgetUsage:
        """Replace the reservation by what the call really cost."""
        def change(u: BudgetUsage) -> None:
            u.reserved.pop(res.id, None)
            u.spent_usd += usd
            u.spent_tokens += tokens

        return await self._update(res.task_id, change)

    async def release(self, res: Reservation) -> None:
        def change(u: BudgetUsage) -> None:
            u.reserved.pop(res.id, None)

        await self._update(res.task_id, change)

    async def count_tool_call(self, task_id: str, budget: Budget) -> None:
        def change(u: BudgetUsage) -> None:
            check(budget, u, 0.0, 0, 1)
            u.tool_calls += 1

        await self._update(task_id, change)


class BudgetBook(_Book):
    """Compare-and-set reservations on the per-task counters in NATS KV."""

    def __init__(self, js: JetStreamContext, *, replicas: int = 1, attempts: int = 50) -> None:
        self.js, self.replicas, self.attempts = js, replicas, attempts
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await ensure_bucket(self.js, subjects.BUCKET_BUDGETS,
                                           replicas=self.replicas, max_age_s=7 * 86400)
        return self._kv

    async def usage(self, task_id: str) -> BudgetUsage:
        kv = await self._bucket()
        try:
            entry = await kv.get(task_id)
        except KeyNotFoundError:
            return BudgetUsage()
        return parse_counter(BudgetUsage, task_id, entry.value)

    async def _update(self, task_id: str, change: Callable[[BudgetUsage], None]) -> BudgetUsage:
        kv = await self._bucket()
        for _ in range(self.attempts):
            try:
                entry = await kv.get(task_id)
                usage = parse_counter(BudgetUsage, task_id, entry.value)
                revision = entry.revision
            except KeyNotFoundError:
                usage, revision = BudgetUsage(), None
            change(usage)
            data = usage.model_dump_json().encode()
            try:
                if revision is None:
                    await kv.create(task_id, data)
                else:
                    await kv.update(task_id, data, last=revision)
                return usage
            except KeyWrongLastSequenceError:
                continue  # someone else changed it first: read again and re-decide
        raise RuntimeError(f"budget counter of {task_id} too contended")


class InMemoryBudgetBook(_Book):
    """The budget book in this process's memory (tests; a one-process mesh)."""

    def __init__(self) -> None:
        self._counters: dict[str, BudgetUsage] = {}

    async def usage(self, task_id: str) -> BudgetUsage:
        return self._counters.get(task_id, BudgetUsage()).model_copy(deep=True)

    async def _update(self, task_id: str, change: Callable[[BudgetUsage], None]) -> BudgetUsage:
        # No await between the read and the write: atomic on the event loop. A refused
        # change (BudgetRefused) leaves the counter as it was.
        usage = self._counters.get(task_id, BudgetUsage()).model_copy(deep=True)
        change(usage)
        self._counters[task_id] = usage
        return usage.model_copy(deep=True)
