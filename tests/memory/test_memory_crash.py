"""The memory service killed with kill -9 during a 50-task run catches up from the ledger."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from memory_helpers import eventually
from pydantic import BaseModel

from jetmesh.agents.models.sim import SimModel
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.agents.tools import tool
from jetmesh.agents.worker import Worker
from jetmesh.bus import events as ev
from jetmesh.bus.connection import connect, jetstream
from jetmesh.bus.server import EmbeddedNats
from jetmesh.memory.client import MemoryClient
from jetmesh.memory.errors import MemoryServiceUnavailable
from jetmesh.memory.models import MemoryItem
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.service import Orchestrator, OrchestratorSettings
from jetmesh.orchestrator.state import TaskState, TaskStatus
from jetmesh.orchestrator.workflows import Workflow, WorkflowRegistry


class EchoIn(BaseModel):
    text: str


class EchoOut(BaseModel):
    text: str


@tool(description="Echo the text in capitals.")
def echo(args: EchoIn) -> EchoOut:
    return EchoOut(text=args.text.upper())


ECHO = AgentSpec(
    name="echo", description="Echoes (no model).",
    skills=[SkillSpec.from_models("echo", "Echo", "Echo a text.", input_model=EchoIn,
                                  output_model=EchoOut)],
    tools=[echo], direct={"echo": "echo"})
SAY = Workflow(name="say", steps=[ev.PlanStep(id="echo", skill="echo",
                                              input={"text": {"$ref": "task.goal"}})])


def memory_command() -> list[str]:
    """`jetmesh memory` once the main CLI has the group, else the group's own module."""
    from jetmesh.orchestrator.cli import app

    if any(g.name == "memory" for g in app.registered_groups):
        return [sys.executable, "-m", "jetmesh.orchestrator.cli", "memory"]
    return [sys.executable, "-m", "jetmesh.orchestrator.cli.memory"]


def spawn_memory(url: str, data_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JETMESH_MEMORY_EMBEDDER": "hash",
           "JETMESH_MODEL_PROVIDER": "sim", "JETMESH_ACK_WAIT_S": "2"}
    with log.open("ab") as f:
        return subprocess.Popen(
            [*memory_command(), "--url", url, "--data-dir", str(data_dir)], env=env,
            stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            kill9(proc)
    return proc.returncode


def print_logs(folder: Path) -> None:
    """The tail of each memory service's log (a failing test shows what it printed)."""
    for log in sorted(folder.glob("memory*.log")):
        print(f"--- {log.name} (last 40 lines) ---",
              *log.read_text(errors="replace").splitlines()[-40:], sep="\n")


async def episodes(memory: MemoryClient) -> list[MemoryItem]:
    try:
        return await memory.list(kind="episode", limit=1000)
    except MemoryServiceUnavailable:
        return []


async def results(client: Client, ids: list[str], timeout: float) -> list[TaskState]:
    """Every task's final state; at the deadline, fail naming the unfinished ones."""
    waits = [asyncio.ensure_future(client.result(t)) for t in ids]
    _, pending = await asyncio.wait(waits, timeout=timeout)
    for w in pending:
        w.cancel()
    if pending:
        late = [t for t, w in zip(ids, waits, strict=True) if w in pending]
        now = {t[:8]: (await client.state(t)).status.value for t in late}
        raise AssertionError(f"{len(late)} of {len(ids)} tasks not finished in {timeout:g}s: "
                             f"{now}"[:2000])
    return [w.result() for w in waits]


# Its own waits add up to 160 s at most (memory up 30, 10 episodes 20, 50 results 60,
# catch-up 50): pytest's limit sits above them, so a slow phase fails with its name.
@pytest.mark.timeout(240)
async def test_kill_9_during_50_tasks_every_episode_exactly_once(
    fresh_server: EmbeddedNats, tmp_path: Path
) -> None:
    url, data = fresh_server.url, tmp_path / "data"
    conns = [await connect(url) for _ in range(3)]
    orch = Orchestrator(conns[0], jetstream(conns[0]), model=SimModel(),
                        settings=OrchestratorSettings(tick_s=0.1),
                        workflows=WorkflowRegistry([SAY]), use_registry=False)
    worker = Worker(ECHO, None, conns[1], jetstream(conns[1]), replica="echo-test")
    memory = MemoryClient(conns[2], timeout_s=2.0)
    await orch.start()
    await worker.start()
    proc = spawn_memory(url, data, tmp_path / "memory1.log")
    try:
        async with Client(url) as client:
            await eventually(lambda: memory.available(0.5), bool, 30, "memory service up")
            ids = [await client.submit(f"hello {i}", workflow="say", user_id="u1")
                   for i in range(25)]
            seen = await eventually(lambda: episodes(memory), lambda e: len(e) >= 10, 20,
                                    "10 episodes")
            kill9(proc)
            assert len(seen) < 100, "the service must be killed before it caught up"
            ids += [await client.submit(f"hello {i}", workflow="say", user_id="u1")
                    for i in range(25, 50)]
            states = await results(client, ids, 60)
            assert Counter(s.status for s in states) == {TaskStatus.COMPLETED: 50}

            proc = spawn_memory(url, data, tmp_path / "memory2.log")
            stored = await eventually(lambda: episodes(memory), lambda e: len(e) >= 100, 50,
                                      "100 episodes after restart")
    except BaseException:
        print_logs(tmp_path)
        raise
    finally:
        stop(proc)
        await worker.stop()
        await orch.stop()
        for nc in conns:
            await nc.close()
    counts = Counter(e.episode_id for e in stored)
    expected = {f"{t}:{s}" for t in ids for s in ("echo", "task")}
    assert set(counts) == expected
    assert set(counts.values()) == {1}, "an episode was written twice"
    assert len(stored) == 100
    print(f"\nkilled the memory service after {len(seen)} of 100 episodes; "
          f"after restart: {len(stored)} episodes, each exactly once")
