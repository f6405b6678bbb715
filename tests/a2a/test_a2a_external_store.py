"""The bucket of external agents: what is added is listed at once, deletions are not."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from jetmesh.a2a.bridge import ExternalAgent, _bucket, list_external, remove_external
from jetmesh.agents.builtin import get_agent
from jetmesh.agents.cards import card_for_spec
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.server import EmbeddedNats


async def test_every_added_agent_is_listed_at_once_and_removed_ones_are_not(
        fresh_server: EmbeddedNats) -> None:
    nc = await connect(fresh_server.url)
    js = jetstream(nc)
    try:
        assert await list_external(js) == []
        kv = await _bucket(js)
        base = ExternalAgent("ext-0", "http://127.0.0.1:1/agents/orders",
                             card_for_spec(get_agent("orders")), datetime.now(UTC).isoformat())
        names: list[str] = []
        for i in range(25):  # each listing right after its put (read your write)
            agent = replace(base, name=f"ext-{i:02d}")
            await kv.put(agent.name, agent.to_json())
            names.append(agent.name)
            assert [a.name for a in await list_external(js)] == names
        await remove_external(js, "ext-03")
        await remove_external(js, "ext-17")
        listed = await list_external(js)
        assert [a.name for a in listed] == [n for n in names if n not in ("ext-03", "ext-17")]
        assert listed[0].card.name == base.card.name
        # A value that is not a registration is left out; the rest are still listed.
        for junk in (b"not json", b"{}", b'{"name": "x", "url": "u", "card": 3, "added_at": 1}'):
            await kv.put(f"junk-{len(junk)}", junk)
        assert [a.name for a in await list_external(js)] == [a.name for a in listed]
    finally:
        await nc.close()
