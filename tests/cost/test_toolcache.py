"""The tool-result cache: read-only tools only, keyed on tool, version and arguments,
TTL per tool, scope per task or shared, hits recorded as such; in memory and on NATS KV."""

from __future__ import annotations

import pytest

from jetmesh.agents import AgentSpec, ListRecorder, SkillSpec, ToolContext, run_step, tool
from jetmesh.agents import toolcache as tc
from jetmesh.agents.cost import CostPolicy
from jetmesh.agents.models.sim import ScriptedModel, tool_call
from jetmesh.agents.toolcache import KVToolCache, MemoryToolCache, ToolCacheRule, cache_key
from jetmesh.bus import subjects

RAN: list[str] = []


@tool(blocking=False)
def price(sku: str) -> dict[str, object]:
    """The price of a SKU (read-only)."""
    RAN.append(sku)
    return {"sku": sku, "usd": 4.5}


@tool(side_effects=True, risk="write", blocking=False)
def reserve(sku: str) -> dict[str, object]:
    """Reserve a SKU (a side effect: never cached)."""
    RAN.append(f"reserve {sku}")
    return {"sku": sku, "reserved": True}


def spec(scope: str = "task", version: str = "1", ttl: float = 60.0) -> AgentSpec:
    rule = ToolCacheRule(ttl_s=ttl, scope=scope, version=version)  # type: ignore[arg-type]
    return AgentSpec(name="shop", description="d",
                     skills=[SkillSpec(id="buy", name="Buy", description="Buy.")],
                     tools=[price, reserve],
                     cost=CostPolicy(tool_cache={"price": rule, "reserve": rule}))


async def buy(s: AgentSpec, cache: MemoryToolCache, task: str, step: str = "s1"
              ) -> ListRecorder:
    rec = ListRecorder()
    model = ScriptedModel([tool_call("price", sku="TEA-7"), tool_call("reserve", sku="TEA-7")],
                          "done")
    out = await run_step(s, "buy", {}, model, recorder=rec, tool_cache=cache,
                         ctx=ToolContext(task_id=task, step_id=step, agent="shop"))
    assert out.ok and model.remaining == 0
    return rec


def hits(rec: ListRecorder) -> list[tuple[str, bool]]:
    return [(t.tool, t.cache_hit) for t in rec.tool_calls]


async def test_read_only_results_are_reused_within_their_scope() -> None:
    RAN.clear()
    cache = MemoryToolCache()
    first = await buy(spec(), cache, "t-a")
    second = await buy(spec(), cache, "t-a", "s2")  # another step of the same task
    assert hits(first) == [("price", False), ("reserve", False)]
    assert hits(second) == [("price", True), ("reserve", False)]
    assert second.tool_calls[0].output == first.tool_calls[0].output
    assert RAN == ["TEA-7", "reserve TEA-7", "reserve TEA-7"]  # the effect always runs
    other = await buy(spec(), cache, "t-b")  # scope "task": another task misses
    assert hits(other)[0] == ("price", False)

    shared = MemoryToolCache()
    await buy(spec("shared"), shared, "t-c")
    assert hits(await buy(spec("shared"), shared, "t-d"))[0] == ("price", True)
    # A new version of the tool does not see the old entries.
    assert hits(await buy(spec("shared", "2"), shared, "t-e"))[0] == ("price", False)


async def test_entries_expire_after_their_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_000_000.0]
    monkeypatch.setattr(tc.time, "time", lambda: now[0])
    cache = MemoryToolCache()
    await buy(spec(ttl=30), cache, "t-ttl")
    now[0] += 29
    assert hits(await buy(spec(ttl=30), cache, "t-ttl", "s2"))[0] == ("price", True)
    now[0] += 2
    assert hits(await buy(spec(ttl=30), cache, "t-ttl", "s3"))[0] == ("price", False)


def test_keys() -> None:
    task, shared = ToolCacheRule(), ToolCacheRule(scope="shared")
    a = cache_key(task, "t1", "price", {"sku": "A", "n": 1})
    assert a == cache_key(task, "t1", "price", {"n": 1, "sku": "A"})  # canonical JSON
    assert a.startswith("task.t1.") and cache_key(shared, "t1", "price", {}).startswith("shared.")
    assert a != cache_key(ToolCacheRule(version="2"), "t1", "price", {"sku": "A", "n": 1})
    assert a != cache_key(task, "t1", "price", {"sku": "B", "n": 1})


async def test_kv_cache_is_shared_by_replicas_and_expires(bus, monkeypatch) -> None:
    one, two = KVToolCache(bus.js), KVToolCache(bus.js)
    key = cache_key(ToolCacheRule(scope="shared"), "t", "price", {"sku": "KV-1"})
    assert await one.get(key) is None
    await one.put(key, {"usd": 1.25}, ttl_s=60)
    assert await two.get(key) == {"usd": 1.25}
    kv = await bus.js.key_value(subjects.BUCKET_TOOL_CACHE)
    assert (await kv.get(key)).value  # stored in the bucket named in bus/subjects
    real = tc.time.time
    monkeypatch.setattr(tc.time, "time", lambda: real() + 61)
    assert await two.get(key) is None
