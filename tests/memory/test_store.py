"""MemoryStore against real mem0 and embedded Qdrant."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from jetmesh.memory import (
    EmbeddingDimensionMismatch,
    EpisodeRecord,
    MemoryInferenceDisabled,
    MemoryNotFound,
    MemorySettings,
    MemoryStore,
    MemoryStoreError,
)


def ep(task: str, step: str | None = None, **kw: object) -> EpisodeRecord:
    fields: dict[str, object] = {
        "request": f"request of {task}",
        "outcome": "done",
        "user_id": "u1",
        "agent_id": "a1",
        "ledger_seqs": [1],
    }
    fields.update(kw)
    return EpisodeRecord(task_id=task, step_id=step, **fields)  # type: ignore[arg-type]


async def test_episode_keeps_provenance_and_is_found_by_scoped_search(store: MemoryStore) -> None:
    flight = await store.add_episode(
        ep(
            "t1",
            "s1",
            request="book a flight to Paris for the conference",
            outcome="booked Air France AF123",
            user_id="alice",
            agent_id="travel",
            cost_usd=0.012,
            ledger_seqs=[4, 5, 9],
        )
    )
    await store.add_episode(
        ep(
            "t2",
            request="book a flight to Paris",
            outcome="booked",
            user_id="bob",
            agent_id="travel",
        )
    )
    await store.add_episode(
        ep("t3", request="summarise the quarterly sales report", user_id="alice", agent_id="writer")
    )

    assert flight.kind == "episode"
    assert (flight.user_id, flight.agent_id, flight.task_id, flight.step_id) == (
        "alice",
        "travel",
        "t1",
        "s1",
    )
    assert flight.episode_id == "t1:s1"
    assert flight.ledger_seqs == [4, 5, 9]
    assert flight.cost_usd == pytest.approx(0.012)
    assert flight.created_at is not None
    assert await store.get(flight.id) == flight

    hits = await store.search("flight to Paris", limit=5)
    assert hits[0].text.startswith("Asked: book a flight to Paris")
    assert hits[0].score is not None and hits[0].score > hits[-1].score  # type: ignore[operator]

    by_user = await store.search("flight to Paris", user_id="alice")
    assert by_user[0].id == flight.id
    assert {h.user_id for h in by_user} == {"alice"}
    assert {h.agent_id for h in await store.search("report", agent_id="writer")} == {"writer"}
    assert [h.task_id for h in await store.search("flight", task_id="t2")] == ["t2"]
    assert await store.search("flight", kind="fact") == []
    assert len(await store.search("flight", kind="episode", limit=10)) == 3
    assert {h.task_id for h in await store.list(user_id="alice")} == {"t1", "t3"}


async def test_adding_the_same_episode_twice_keeps_one(store: MemoryStore) -> None:
    first = await store.add_episode(ep("t1", "s1"))
    again = await store.add_episode(ep("t1", "s1"))
    both = await asyncio.gather(
        store.add_episode(ep("t1", "s2")), store.add_episode(ep("t1", "s2"))
    )
    assert again.id == first.id
    assert both[0].id == both[1].id
    assert sorted(m.episode_id or "" for m in await store.list(task_id="t1")) == ["t1:s1", "t1:s2"]


async def test_twenty_concurrent_writers_all_land(store: MemoryStore) -> None:
    episodes = [
        ep(f"task{i % 4}", f"s{i}", user_id=f"user{i % 3}", agent_id=f"agent{i % 5}")
        for i in range(20)
    ]
    items = await asyncio.gather(*(store.add_episode(e) for e in episodes))
    assert len({i.id for i in items}) == 20
    stored = await store.list(kind="episode")
    assert sorted(m.episode_id or "" for m in stored) == sorted(e.episode_id for e in episodes)
    for i in items:
        assert (await store.get(i.id)).episode_id == i.episode_id


async def test_forget_task_removes_its_episodes_and_facts_derived_only_from_them(
    store: MemoryStore,
) -> None:
    a1 = await store.add_episode(ep("ta", "s1"))
    a2 = await store.add_episode(ep("ta", "s2"))
    b1 = await store.add_episode(ep("tb", "s1"))
    only_a = await store._add_facts_verbatim(
        ["alice prefers aisle seats"],
        derived_from=[a1.episode_id or "", a2.episode_id or ""],
        user_id="u1",
    )
    mixed = await store._add_facts_verbatim(
        ["alice flies Air France"],
        derived_from=[a1.episode_id or "", b1.episode_id or ""],
        user_id="u1",
    )
    only_b = await store._add_facts_verbatim(
        ["alice lives in Lyon"], derived_from=[b1.episode_id or ""], user_id="u1"
    )
    assert mixed[0].derived_task_ids == ["ta", "tb"]

    report = await store.forget_task("ta")

    assert sorted(report.episodes_deleted) == sorted([a1.id, a2.id])
    assert report.facts_deleted == [only_a[0].id]
    assert report.facts_updated == [mixed[0].id]
    for gone in (a1.id, a2.id, only_a[0].id):
        with pytest.raises(MemoryNotFound):
            await store.get(gone)
    kept = await store.get(mixed[0].id)
    assert kept.text == "alice flies Air France"
    assert kept.derived_from == ["tb:s1"]
    assert kept.derived_task_ids == ["tb"]
    assert (await store.get(only_b[0].id)).derived_from == ["tb:s1"]
    assert (await store.get(b1.id)).task_id == "tb"
    assert await store.search("aisle seats", kind="fact", user_id="u1", limit=10) != []
    assert {m.text for m in await store.list(kind="fact")} == {
        "alice flies Air France",
        "alice lives in Lyon",
    }
    assert (await store.forget_task("ta")).episodes_deleted == []


async def test_facts_need_existing_episodes(store: MemoryStore) -> None:
    with pytest.raises(MemoryNotFound) as info:
        await store._add_facts_verbatim(["x"], derived_from=["nope:task"], user_id="u1")
    assert info.value.memory_id == "nope:task"


async def test_add_facts_raises_when_no_llm_is_configured(store: MemoryStore) -> None:
    assert store.inference_off_reason is not None
    with pytest.raises(MemoryInferenceDisabled) as info:
        await store.add_facts("alice likes tea", derived_from=[], user_id="u1")
    assert "no LLM" in info.value.reason


async def test_add_facts_through_a_scripted_mem0_llm(tmp_path: Path) -> None:
    settings = MemorySettings(
        data_dir=tmp_path,
        embedder="hash",
        llm={
            "provider": "jetmesh_scripted",
            "config": {"facts": ["Alice prefers window seats", "Alice is vegetarian"]},
        },
    )
    async with await MemoryStore.open(settings) as store:
        episode = await store.add_episode(ep("t1", user_id="alice"))
        facts = await store.add_facts(
            [{"role": "user", "content": "I want a window seat, and no meat please"}],
            derived_from=[episode.episode_id or ""],
            user_id="alice",
        )
        assert sorted(f.text for f in facts) == [
            "Alice is vegetarian",
            "Alice prefers window seats",
        ]
        assert all(f.kind == "fact" and f.derived_from == ["t1:task"] for f in facts)
        assert all(f.user_id == "alice" for f in facts)
        report = await store.forget_task("t1")
        assert sorted(report.facts_deleted) == sorted(f.id for f in facts)


async def test_infer_switch_off_disables_facts_even_with_an_llm(tmp_path: Path) -> None:
    settings = MemorySettings(
        data_dir=tmp_path, embedder="hash", infer=False, llm={"provider": "jetmesh_scripted"}
    )
    async with await MemoryStore.open(settings) as store:
        with pytest.raises(MemoryInferenceDisabled, match="JETMESH_MEMORY_INFER"):
            await store.add_facts("x", derived_from=[], user_id="u1")


async def test_reopening_with_another_dimension_is_a_typed_error(settings: MemorySettings) -> None:
    store = await MemoryStore.open(settings)
    await store.add_episode(ep("t1"))
    await store.close()

    other = settings.model_copy(update={"hash_dims": 384})
    with pytest.raises(EmbeddingDimensionMismatch) as info:
        await MemoryStore.open(other)
    err = info.value
    assert (err.collection, err.expected, err.got) == ("jetmesh_memory", 256, 384)

    # The failed open released the folder: the right embedder still opens it.
    async with await MemoryStore.open(settings) as again:
        assert len(await again.list()) == 1


async def test_reopen_after_close_sees_the_data(settings: MemorySettings) -> None:
    store = await MemoryStore.open(settings)
    item = await store.add_episode(ep("t1", "s1", ledger_seqs=[7, 8]))
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(MemoryStoreError):
        await store.list()

    async with await MemoryStore.open(settings) as reopened:
        again = await reopened.get(item.id)
        assert again == item
        assert (await reopened.add_episode(ep("t1", "s1"))).id == item.id
        assert [h.id for h in await reopened.search("request of t1", task_id="t1")] == [item.id]
    assert settings.history_db_path.exists()
    assert settings.qdrant_path.is_dir()


async def test_unknown_ids_raise_memory_not_found(store: MemoryStore) -> None:
    for bad in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(MemoryNotFound):
            await store.get(bad)
