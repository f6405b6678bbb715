"""The ports' in-memory stand-ins behave as the real ones do (the same test runs on both)."""

from __future__ import annotations

import asyncio

import pytest

from jetmesh.bus import events as ev
from jetmesh.bus.budgets import BudgetBook, BudgetRefused, Budgets, InMemoryBudgetBook
from jetmesh.bus.errors import AppendConflict
from jetmesh.bus.ledger import is_log_seq
from jetmesh.bus.ledger_port import InMemoryLedger, TaskLedger


@pytest.fixture(params=["nats", "memory"])
def book(request: pytest.FixtureRequest, bus) -> Budgets:
    return BudgetBook(bus.js) if request.param == "nats" else InMemoryBudgetBook()


async def test_a_budget_book_reserves_settles_and_refuses_what_would_overrun(
        book: Budgets) -> None:
    tid, budget = ev.new_id(), ev.Budget(max_usd=1.0, max_tokens=100, max_tool_calls=1)
    first = await book.reserve(tid, budget, usd=0.6, tokens=10)
    with pytest.raises(BudgetRefused) as refused:
        await book.reserve(tid, budget, usd=0.5)  # 0.6 reserved + 0.5 > 1.0
    assert refused.value.kind == "usd"
    usage = await book.settle(first, usd=0.2, tokens=30)
    assert usage.spent_usd == pytest.approx(0.2) and usage.reserved == {}
    second = await book.reserve(tid, budget, usd=0.5)  # fits now: 0.2 spent
    await book.release(second)
    await book.count_tool_call(tid, budget)
    with pytest.raises(BudgetRefused):
        await book.count_tool_call(tid, budget)
    with pytest.raises(BudgetRefused):
        await book.reserve(tid, budget, tokens=71)  # 30 spent + 71 > 100
    final = await book.usage(tid)
    assert (final.spent_usd, final.spent_tokens, final.tool_calls, final.reserved) == \
        (pytest.approx(0.2), 30, 1, {})


async def test_concurrent_reservations_never_overrun_the_budget(book: Budgets) -> None:
    tid, budget = ev.new_id(), ev.Budget(max_usd=1.0)
    results = await asyncio.gather(*(book.reserve(tid, budget, usd=0.3) for _ in range(6)),
                                   return_exceptions=True)
    assert sum(not isinstance(r, BaseException) for r in results) == 3
    assert all(isinstance(r, BudgetRefused) for r in results if isinstance(r, BaseException))
    assert (await book.usage(tid)).reserved_usd == pytest.approx(0.9)


@pytest.fixture(params=["nats", "memory"])
def ledger(request: pytest.FixtureRequest, bus) -> TaskLedger:
    return bus.ledger if request.param == "nats" else InMemoryLedger()


async def test_a_ledger_stores_in_order_drops_duplicates_and_fences(ledger: TaskLedger) -> None:
    tid = ev.new_id()
    submitted = ev.TaskSubmitted(id=f"{tid}-submitted", subject=tid,
                                 data=ev.TaskSubmittedData(goal="x"))
    first = await ledger.append(submitted, expected_last_subject_seq=0)
    assert await ledger.append(submitted) == first  # the same id: a duplicate
    with pytest.raises(AppendConflict):  # the task's subject is no longer empty
        await ledger.append(ev.TaskRejected(subject=tid, data=ev.TaskRejectedData(
            reason="late")), expected_last_subject_seq=0)
    claim = await ledger.append(ev.StepStarted(subject=tid, data=ev.StepStartedData(
        step_id="a", agent="w", worker="w-1")), expected_last_subject_seq=0)
    acks = await ledger.append_pipelined([
        ev.ModelCalled(subject=tid, data=ev.ModelCalledData(
            step_id="a", agent="w", worker="w-1", provider="sim", model="m", response={})),
        ev.StepCompleted(subject=tid, data=ev.StepCompletedData(
            step_id="a", agent="w", output={"n": 1}))], expect=[None, None])
    assert [a.duplicate for a in acks] == [False, False] and is_log_seq(acks[0].seq)
    everything = await ledger.read(tid)  # the log record with them (its order between
    # the two streams is the server's time stamps': not asserted here)
    assert [type(e.event) for e in everything if not is_log_seq(e.seq)] == [
        ev.TaskSubmitted, ev.StepStarted, ev.StepCompleted]
    assert [e.seq for e in everything if is_log_seq(e.seq)] == [acks[0].seq]
    decisions = await ledger.read(tid, without_logs=True, from_seq=claim)
    assert [e.seq for e in decisions] == [claim, acks[1].seq]
    seen: list[type] = []
    async with asyncio.timeout(10):
        async for entry in ledger.follow(tid):
            seen.append(type(entry.event))
            if len(seen) == 2:
                await ledger.append(ev.TaskCompleted(subject=tid, data=ev.TaskCompletedData(
                    result={})))
            if isinstance(entry.event, ev.TaskCompleted):
                break
    assert seen == [ev.TaskSubmitted, ev.StepStarted, ev.StepCompleted, ev.TaskCompleted]
