"""`jetmesh replay`, `fork` and `diff` as commands (subprocesses) against an in-process mesh."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from jetmesh.orchestrator.state import TaskStatus

CREDENTIALS = ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX", "NATS_CREDS")


async def jetmesh(*args: str, url: str, cwd: str) -> tuple[int, str]:
    """The CLI in a subprocess, awaited without blocking the mesh's event loop."""
    env = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetmesh.orchestrator.cli", *args, "--url", url, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**env, "COLUMNS": "240"})
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_replay_fork_and_diff_commands(make_mesh, tmp_path) -> None:
    mesh = await make_mesh(["support"])
    tid = await mesh.client.submit("status", workflow="fanout",
                                   input={"order_ids": ["A1001", "A1002", "A1003"]})
    assert (await mesh.client.result(tid, timeout=30)).status is TaskStatus.COMPLETED
    cwd = str(tmp_path)

    code, out = await jetmesh("replay", tid, "--json", url=mesh.url, cwd=cwd)
    assert code == 0, out
    rep = json.loads(out)
    assert rep["identical"] and rep["first_divergence"] is None
    assert [s["step"] for s in rep["steps"]] == ["order0", "order1", "order2"]
    assert all(s["b"]["model_calls"] == 0 for s in rep["steps"])

    code, out = await jetmesh("fork", tid, "--from", "order1", "--patch-input",
                              '{"order_ids": ["A1001", "A1004", "A1003"]}', "--json",
                              url=mesh.url, cwd=cwd)
    assert code == 0, out
    rep = json.loads(out)
    changed = {s["step"] for s in rep["steps"] if not s["identical"]}
    assert changed == {"order1"}, rep
    assert "order1" in rep["first_divergence"]

    code, out = await jetmesh("diff", tid, rep["b"], url=mesh.url, cwd=cwd)
    assert code == 0 and "order1" in out and "first divergence" in out, out

    code, out = await jetmesh("fork", tid, "--from", "nope", url=mesh.url, cwd=cwd)
    assert code == 1 and "no step nope" in out, out
