"""The README's main path: `jetmesh up` in one terminal, `jetmesh submit --wait` in another."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jetmesh.bus.server import discover_url

CREDENTIALS = ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX", "NATS_CREDS")
ENV = {k: v for k, v in os.environ.items() if k not in CREDENTIALS}


def jetmesh(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jetmesh.orchestrator.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**ENV, "COLUMNS": "200"})


def test_up_then_submit_wait_then_ctrl_c(tmp_path: Path) -> None:
    up = subprocess.Popen(
        [sys.executable, "-m", "jetmesh.orchestrator.cli", "up", "--port", "0", "--plain"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**ENV, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:  # wait for the "started N processes" line, not a sleep
            lines.append(line)
            if line.startswith("started "):
                break
        assert discover_url(tmp_path / ".jetmesh") is not None, "".join(lines)
        # Every built-in agent must be live before the plan needs it.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            agents = jetmesh("agents", cwd=tmp_path)
            if all(name in agents.stdout for name in ("support", "triage", "writer",
                                                       "reviewer", "orders")):
                break
        res = jetmesh("submit", "where is my order?", "--workflow", "support",
                      "--input", json.dumps({"order_id": "A1001"}), "--wait", cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "completed" in res.stdout
        # The summary counts the steps' logs too (model and tool calls live in JM_LOG).
        summary = next(x for x in res.stdout.splitlines() if " model calls · " in x)
        assert " 0 model calls" not in summary and " 0 tool calls" not in summary, summary
        assert "step review" in res.stdout
        tid = res.stdout.split("task ", 1)[1].split()[0]
        show = jetmesh("show", tid, cwd=tmp_path)
        assert show.returncode == 0 and "reviewer" in show.stdout and "timeline" in show.stdout
        tasks = jetmesh("tasks", cwd=tmp_path)
        assert tid[:12] in tasks.stdout and "completed" in tasks.stdout
        # `approve` logs in as the approver (from the data directory) and reads the task.
        approve = jetmesh("approve", tid, cwd=tmp_path)
        assert approve.returncode == 1 and tid in approve.stderr, approve  # nothing to do
        # Every role ran as its own user (the default) and nothing it did was refused.
        log = (tmp_path / ".jetmesh" / "nats" / "nats-server.log").read_text(errors="replace")
        refused = [x for x in log.splitlines() if "Violation" in x]
        assert refused == [], refused[:5]
        assert (tmp_path / ".jetmesh" / "nats-auth.env").exists()
    finally:
        os.killpg(up.pid, signal.SIGINT)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped" in out
    # Nothing is left running: the server's URL file is gone and its port is closed.
    assert discover_url(tmp_path / ".jetmesh") is None
