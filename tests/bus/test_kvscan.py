"""Reading a KV bucket's current values is complete every time (bus.kvscan).

nats-py's watch/keys can report "all initial values delivered" before any arrive
(nats.py issue 842): `jetmesh stats` once read 0 of 200 records. These tests read a
bucket many times over and want every live key, its newest value, and nothing deleted."""

from __future__ import annotations

import asyncio

from nats.js.api import KeyValueConfig

from jetmesh.bus import events as ev
from jetmesh.bus.kvscan import current_entries


async def _bucket(bus):
    name = "scan-" + ev.new_id()[:8]
    return name, await bus.js.create_key_value(KeyValueConfig(bucket=name, history=3))


async def test_empty_bucket_reads_empty(bus) -> None:
    name, kv = await _bucket(bus)
    assert await current_entries(bus.js, name) == []
    await kv.put("gone", b"x")
    await kv.delete("gone")
    await kv.put("purged", b"y")
    await kv.purge("purged")
    assert await current_entries(bus.js, name) == []


async def test_every_live_key_with_its_newest_value_every_time(bus) -> None:
    name, kv = await _bucket(bus)
    expected: dict[str, bytes] = {}
    for i in range(400):
        await kv.put(f"task.t{i}", f"v{i}".encode())
        expected[f"task.t{i}"] = f"v{i}".encode()
    for i in range(0, 400, 7):  # rewritten: the newest value only
        await kv.put(f"task.t{i}", f"w{i}".encode())
        expected[f"task.t{i}"] = f"w{i}".encode()
    for i in range(3, 400, 11):  # deleted: left out
        await kv.delete(f"task.t{i}")
        expected.pop(f"task.t{i}")
    await kv.put("other.x", b"not task")
    await kv.put("task.empty", b"")  # an empty value is no record

    reads = await asyncio.gather(*(current_entries(bus.js, name, "task.*")
                                   for _ in range(25)))
    for got in reads:
        assert {e.key: e.value for e in got} == expected
        revisions = [e.revision for e in got]
        assert revisions == sorted(revisions)  # stream order
        assert all(e.created is not None for e in got)
    every = await current_entries(bus.js, name)
    assert {e.key for e in every} == set(expected) | {"other.x"}
