"""`jetmesh memory` commands: search, forget, status, and a refused store."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from memory_helpers import Served
from typer.testing import CliRunner

from jetmesh.memory import EpisodeRecord, MemorySettings, MemoryStore
from jetmesh.orchestrator.cli.memory import memory_app


def invoke(args: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return CliRunner().invoke(memory_app, args, env=env)
    finally:
        root.handlers[:], root.level = handlers, level


async def test_search_forget_and_status_from_the_command_line(served: Served) -> None:
    for task, user in (("t1", "alice"), ("t2", "bob")):
        await served.client.add_episode(EpisodeRecord(
            task_id=task, step_id="s1", request="how long do refunds take", outcome="7 days",
            user_id=user, agent_id="researcher"))
    url = ["--url", served.url]
    found = await asyncio.to_thread(
        invoke, ["search", "refunds", "--user", "alice", "--json", *url])
    assert found.exit_code == 0, found.output
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    assert [(r["task_id"], r["user_id"]) for r in rows] == [("t1", "alice")]

    table = await asyncio.to_thread(invoke, ["search", "refunds", "--agent", "researcher", *url])
    assert table.exit_code == 0 and "t1" in table.stdout and "t2" in table.stdout

    gone = await asyncio.to_thread(invoke, ["forget", "--task", "t1", *url])
    assert gone.exit_code == 0, gone.output
    assert "forgot task t1: 1 episodes" in gone.stdout
    assert [i.task_id for i in await served.client.list()] == ["t2"]

    status = await asyncio.to_thread(invoke, ["status", *url])
    assert json.loads(status.stdout)["embedder"] == "jetmesh-hash-256"

    bad = await asyncio.to_thread(invoke, ["search", "x", "--user", "has space", *url])
    assert bad.exit_code != 0


def test_no_memory_service_is_one_clear_line(nats_server) -> None:  # type: ignore[no-untyped-def]
    result = invoke(["search", "x", "--url", nats_server.url, "--timeout", "1"])
    assert result.exit_code == 1
    assert "memory service unavailable on jm.memory.search (no responders)" in result.output


def test_a_dimension_mismatch_refuses_to_serve_with_the_reason(tmp_path: Path) -> None:
    store = MemoryStore.open_sync(MemorySettings(data_dir=tmp_path, embedder="hash",
                                                 hash_dims=256))
    asyncio.run(store.close())
    result = invoke(["--url", "nats://127.0.0.1:1", "--data-dir", str(tmp_path)],
                    env={"JETMESH_MEMORY_EMBEDDER": "hash", "JETMESH_MEMORY_HASH_DIMS": "64"})
    assert result.exit_code == 2
    assert "holds 256-dimensional vectors" in result.output
    assert "produces 64" in result.output
