"""The ports' in-memory stand-ins behave as the real ones do (the same test runs on both)."""

from __future__ import annotations

import asyncio

import pytest

from jetmesh.bus import events as ev
from jetmesh.bus.budgets import BudgetBook, BudgetRefused, Budgets, InMemoryBudgetBook


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
