"""A budget or spend counter whose stored value does not parse refuses spending against
it, with a reason naming the key: never a crash, never a counter started again at zero
(which would forget what was spent)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.budgets import BudgetBook, BudgetRefused, CounterUnreadable
from jetmesh.bus.presence import ensure_bucket
from jetmesh.bus.spendcaps import Cap, SpendBook, SpendCaps


@pytest.mark.parametrize("junk", [b"not json", b"[]", b'{"spent_usd": "lots"}',
                                  b'{"usd": 5}'])
async def test_an_unreadable_task_budget_counter_refuses_spending(bus, junk) -> None:
    task_id = "t-junk-" + ev.new_id()[:8]
    kv = await ensure_bucket(bus.js, subjects.BUCKET_BUDGETS, max_age_s=7 * 86400)
    await kv.put(task_id, junk)
    book = BudgetBook(bus.js)
    with pytest.raises(CounterUnreadable, match=f"spend counter {task_id} is not readable"):
        await book.reserve(task_id, ev.Budget(max_usd=1.0), usd=0.01)
    with pytest.raises(BudgetRefused):  # what the guard catches: the step is refused
        await book.count_tool_call(task_id, ev.Budget(max_tool_calls=5))
    assert (await kv.get(task_id)).value == junk  # left as found


async def test_an_unreadable_spend_counter_refuses_and_the_others_are_untouched(bus) -> None:
    tenant = "tj" + ev.new_id()[:6]
    caps = SpendCaps(tenants={tenant: Cap(daily_usd=1.0, monthly_usd=5.0)})
    book = SpendBook(bus.js, caps)
    [(day_key, *_), (month_key, *_)] = caps.counters(tenant, None, datetime.now(UTC))
    kv = await ensure_bucket(bus.js, subjects.BUCKET_SPEND, max_age_s=62 * 86400)
    await kv.put(month_key, b'{"spent_usd": {"no": 1}}')
    with pytest.raises(CounterUnreadable, match=month_key):
        await book.reserve(tenant, None, 0.10)
    # The day counter's reservation was given back when the month one refused.
    day = await book.counter(day_key)
    assert day.reserved_usd == 0 and day.spent_usd == 0
