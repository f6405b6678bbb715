"""examples/node (a Node.js client written from the README) against a real mesh: Node's
own test runner (`node --test`) with NATS_URL set. Skipped where node/npm are missing."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest
from a2a_mesh import Mesh
from a2a_support import Bus

from jetmesh.agents.builtin import get_agent
from jetmesh.agents.models.sim import SimModel

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


def _installed() -> bool:
    return (EXAMPLE / "node_modules" / "nats").is_dir()


@pytest.fixture(scope="module")
def node() -> str:
    exe = shutil.which("node")
    if exe is None:
        pytest.skip("node is not installed")
    if not _installed():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed (examples/node needs the `nats` package)")
        import subprocess

        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE,
                              capture_output=True, text=True, timeout=110, check=False)
        if done.returncode != 0 or not _installed():
            pytest.skip(f"npm ci failed (no registry?): {done.stderr[-300:]}")
    return exe


async def test_node_client_submits_and_follows_a_task_to_its_end(node: str, a2a_bus: Bus
                                                                 ) -> None:
    mesh = Mesh(a2a_bus.url, [get_agent("support")], models={"support": SimModel()})
    await mesh.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            node, "--test", cwd=EXAMPLE, env={**os.environ, "NATS_URL": a2a_bus.url},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        await mesh.stop()
    text = out.decode()
    assert proc.returncode == 0, text[-3000:]
    assert "# pass 2" in text and "# fail 0" in text, text[-2000:]
