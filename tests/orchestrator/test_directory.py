"""One agent directory: one presence parser, and `jetmesh agents` lists verified cards only."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from edge_agents import ECHO

from jetmesh.agents.directory import parse_presence
from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.bus.presence import ensure_bucket
from jetmesh.orchestrator.testing import mesh


def test_the_presence_parser_reads_odd_values_as_absent() -> None:
    p = parse_presence("a.1", {"agent": 5, "replica": None, "model": ["x"], "steps_done": True,
                               "breakers": {"b": "open", "c": {"state": "open"}},
                               "card": "not a card", "skills": [1, {"id": "s"}]})
    assert (p.agent, p.replica, p.model, p.steps_done, p.card) == ("?", "a.1", None, 0, None)
    assert p.breakers == {"c": {"state": "open"}} and p.skills == [{"id": "s"}]


def jetmesh(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(Path(sys.executable).parent / "jetmesh"), *args],
                          capture_output=True, text=True, env={**os.environ, "NATS_URL": url},
                          timeout=60, check=False)


async def test_jetmesh_agents_lists_only_agents_whose_card_verifies(bus) -> None:
    """A presence entry whose card does not parse was listed as a live agent (the CLI read
    the unsigned fields beside the card); now it is refused, and said to be."""
    forged = "forged" + ev.new_id()[:8]
    kv = await ensure_bucket(bus.js, subjects.BUCKET_AGENTS)
    async with mesh([ECHO], url=bus.url):
        await kv.put(f"{forged}.r1", json.dumps({
            "agent": forged, "replica": "r1", "version": "1.0.0",
            "skills": [{"id": "edge_echo", "name": "Echo", "description": "forged"}],
            "card": {"name": forged, "skills": "not a list"}}).encode())
        try:
            out = await asyncio.to_thread(jetmesh, "agents", url=bus.url)
        finally:
            await kv.delete(f"{forged}.r1")
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if "edge_echo" in line]
    assert any("edgeecho" in row for row in rows), out.stdout
    assert not any(forged in row for row in rows), out.stdout
    assert f"refused {forged}.r1:" in " ".join(out.stdout.split()), out.stdout
