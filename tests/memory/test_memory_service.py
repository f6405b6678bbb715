"""The memory service over NATS request/reply: scopes, forget, errors, concurrent writers."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
from memory_helpers import Served
from pydantic import ValidationError

from jetmesh.bus.connection import connect
from jetmesh.memory import (
    EmbeddingDimensionMismatch,
    EpisodeRecord,
    MemoryNotFound,
    MemorySettings,
    MemoryStore,
)
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.errors import MemoryServiceUnavailable
from jetmesh.memory.service import run_memory_service


def ep(task: str, step: str | None = None, **kw: object) -> EpisodeRecord:
    fields: dict[str, object] = {"request": f"request of {task}", "outcome": "done",
                                 "user_id": "u1", "agent_id": "a1", "ledger_seqs": [1]}
    fields.update(kw)
    return EpisodeRecord(task_id=task, step_id=step, **fields)  # type: ignore[arg-type]


async def test_scope_filters_through_the_service(served: Served) -> None:
    c = served.client
    await c.add_episode(ep("t1", "s1", request="book a flight to Paris", outcome="booked AF123",
                           user_id="alice", agent_id="travel"))
    await c.add_episode(ep("t2", "s1", request="book a flight to Paris", outcome="booked",
                           user_id="bob", agent_id="travel"))
    await c.add_episode(ep("t3", "s1", request="summarise the sales report",
                           user_id="alice", agent_id="writer"))
    note = await c.add_note("alice prefers aisle seats", user_id="alice", agent_id="travel",
                            task_id="t1", step_id="s1", key="k1")

    assert {i.user_id for i in await c.search("flight to Paris", user_id="alice")} == {"alice"}
    assert {i.task_id for i in await c.search("flight", agent_id="travel", kind="episode",
                                              limit=10)} == {"t1", "t2"}
    assert [i.task_id for i in await c.search("flight", task_id="t2")] == ["t2"]
    assert [i.id for i in await c.search("aisle seats", user_id="alice", kind="fact")] == [
        note.id]
    assert {i.task_id for i in await c.list(user_id="alice", kind="episode")} == {"t1", "t3"}
    assert (await c.get(note.id)).derived_from == ["t1:s1"]
    # remember is idempotent by its key
    assert (await c.add_note("alice prefers aisle seats", user_id="alice", key="k1")).id == \
        note.id


async def test_forget_through_the_service_removes_the_task_and_its_notes(served: Served) -> None:
    c = served.client
    kept = await c.add_episode(ep("keep", "s1"))
    gone = await c.add_episode(ep("gone", "s1"))
    note = await c.add_note("derived from gone", user_id="u1", task_id="gone", step_id="s1")
    report = await c.forget("gone")
    assert report.episodes_deleted == [gone.id]
    assert report.facts_deleted == [note.id]
    assert [i.task_id for i in await c.list(kind="episode")] == ["keep"]
    with pytest.raises(MemoryNotFound):
        await c.get(gone.id)
    assert (await c.get(kept.id)).episode_id == "keep:s1"
    assert (await c.forget("gone")).episodes_deleted == []


async def test_bad_requests_get_error_replies_with_reasons(served: Served) -> None:
    c = served.client
    reply = await c.raw("add", b"{not json")
    assert not reply.ok and reply.error is not None and reply.error.code == "invalid_request"
    reply = await c.raw("search", {"query": "", "limit": 1000, "color": "red"})
    assert reply.error is not None and reply.error.code == "invalid_request"
    assert {tuple(d["loc"]) for d in reply.error.details} == {("query",), ("limit",),
                                                              ("color",)}
    reply = await c.raw("add", {"kind": "note", "text": "no scope at all"})
    assert reply.error is not None and "needs a scope" in reply.error.details[0]["msg"]
    reply = await c.raw("add", {"kind": "episode", "episode": {
        "task_id": "has space", "request": "r", "outcome": "o"}})
    assert reply.error is not None and reply.error.details[0]["loc"][-1] == "task_id"
    with pytest.raises(MemoryNotFound):
        await c.get("not-a-uuid")
    with pytest.raises(ValidationError):  # the client validates before it sends
        await c.search("x", user_id="white space")
    reply = await c.raw("nope", {})
    assert reply.error is not None and "unknown memory operation" in reply.error.message
    # the service is still there after all of that
    assert (await c.status()).following_ledger is False


async def test_twenty_concurrent_writers_lose_nothing(served: Served) -> None:
    conns = [await connect(served.url) for _ in range(20)]
    try:
        async def writer(i: int, client: MemoryClient) -> list[str]:
            ids = []
            for j in range(5):
                item = await client.add_episode(
                    ep(f"task{i}", f"s{j}", user_id=f"user{i % 3}", agent_id=f"agent{i % 4}"))
                ids.append(item.episode_id or "")
            note = await client.add_note(f"writer {i} was here", user_id=f"user{i % 3}",
                                         task_id=f"task{i}", key=f"note-{i}")
            ids.append(note.id)
            return ids

        results = await asyncio.gather(
            *(writer(i, MemoryClient(nc)) for i, nc in enumerate(conns)))
    finally:
        for nc in conns:
            await nc.close()
    stored = await served.client.list(kind="episode", limit=1000)
    counts = Counter(i.episode_id for i in stored)
    assert len(counts) == 100 and set(counts.values()) == {1}
    assert counts.keys() == {eid for r in results for eid in r[:5]}
    facts = await served.client.list(kind="fact", limit=1000)
    assert sorted(f.text for f in facts) == sorted(f"writer {i} was here" for i in range(20))
    assert (await served.client.status()).episodes == 100


async def test_dimension_mismatch_is_a_clear_error_and_nothing_answers(
    bus, tmp_path: Path
) -> None:
    settings = MemorySettings(data_dir=tmp_path / "d", embedder="hash", hash_dims=256,
                              collection="dims_check")
    store = await MemoryStore.open(settings)
    await store.add_episode(ep("t1"))
    await store.close()
    wrong = settings.model_copy(update={"hash_dims": 64})
    with pytest.raises(EmbeddingDimensionMismatch) as info:
        await run_memory_service(bus.url, wrong, stop=asyncio.Event())
    assert (info.value.expected, info.value.got) == (256, 64)
    assert "holds 256-dimensional vectors" in str(info.value)
    assert "produces 64" in str(info.value)
    client = MemoryClient(bus.nc, timeout_s=0.5)
    assert not await client.available()
    with pytest.raises(MemoryServiceUnavailable, match="is `jetmesh memory` running"):
        await client.search("anything")


async def test_hostile_requests_get_error_replies_and_the_service_stays(served: Served) -> None:
    """The bus's edge rules on request/reply too: deep JSON, lone surrogates, NaN and
    bytes that are not UTF-8 get an invalid_request reply with the reason."""
    c = served.client
    hostile = [
        b'{"query": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        b'{"kind": "note", "text": "\\ud800", "user_id": "u1"}',
        b'{"query": "x", "limit": NaN}',
        b'{"query": "\xff\xfe"}',
        b"[" * 200_000,
    ]
    for op in ("add", "search"):
        for raw in hostile:
            reply = await c.raw(op, raw)
            assert not reply.ok and reply.error is not None, (op, raw[:40])
            assert reply.error.code == "invalid_request", (op, raw[:40], reply.error)
    assert (await c.status()).following_ledger is False
