"""The README's quick start, its commands as written, against `jetmesh up --plain`: the
plain output's commands are whole lines (copy-paste works), a planned goal gets a labelled
answer from the knowledge base, and a refund over the approval threshold waits for
`jetmesh approve TASK`, then completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from jetmesh.bus.server import discover_url

DROP = ("NATS_URL", "NATS_USER", "NATS_PASSWORD", "NATS_INBOX_PREFIX", "NATS_CREDS", "COLUMNS",
        "JETMESH_DATA_DIR")
ENV = {k: v for k, v in os.environ.items() if k not in DROP}  # off a terminal: 80 columns
CLI = [sys.executable, "-m", "jetmesh.orchestrator.cli"]
REFUND = {"order_id": "A1023", "amount_usd": 218, "reason": "arrived damaged"}


def jetmesh(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=90, env=ENV)


def test_quick_start_as_written(tmp_path: Path) -> None:
    up = subprocess.Popen([*CLI, "up", "--port", "0", "--plain"], cwd=tmp_path,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**ENV, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:  # up to its last banner line, not a sleep
            lines.append(line.rstrip("\n"))
            if line.startswith("Ctrl-C stops everything"):
                break
        shown = [x.strip() for x in lines if x.strip().startswith("jetmesh submit")]
        assert len(shown) == 2, lines
        assert all(x.endswith("--wait") and len(x) > 80 for x in shown), lines  # unwrapped
        assert discover_url(tmp_path / ".jetmesh") is not None, lines
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            agents = jetmesh("agents", cwd=tmp_path).stdout
            if all(n in agents for n in ("support", "researcher", "writer", "triage")):
                break

        # A goal without a workflow: planned from the live skills, answered from the KB.
        res = jetmesh("submit", "Summarise our returns policy", "--wait", cwd=tmp_path)
        assert res.returncode == 0, res.stdout + res.stderr
        assert "step research" in res.stdout and "step triage" not in res.stdout
        assert "[simulated model]" in res.stdout and "30 days" in res.stdout

        # The refund over $200: waits for approval, `jetmesh approve`, completes.
        submit = subprocess.Popen(
            [*CLI, "submit", "refund my damaged order", "--workflow", "refund", "--input",
             json.dumps(REFUND), "--wait"], cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, env={**ENV, "PYTHONUNBUFFERED": "1"})
        assert submit.stdout is not None
        seen = []
        for line in submit.stdout:
            seen.append(line)
            if "waiting for approval" in line:
                break
        out = "".join(seen)
        assert "waiting for approval" in out, out
        tid = out.split("task ", 1)[1].split()[0]
        assert f"jetmesh approve {tid}" in out
        approve = jetmesh("approve", tid, cwd=tmp_path)
        assert approve.returncode == 0, approve.stdout + approve.stderr
        assert "approved: step refund issue_refund" in approve.stdout
        rest, _ = submit.communicate(timeout=90)
        assert submit.returncode == 0, out + rest
        assert "completed" in rest and "step reply" in rest
        refunds = tmp_path / ".jetmesh" / "refunds.jsonl"  # the agents' data directory
        show = jetmesh("show", tid, cwd=tmp_path).stdout
        assert "approved issue_refund by" in show
        (record,) = [json.loads(x) for x in refunds.read_text().splitlines()]  # made, once
        assert record["order_id"] == "A1023" and record["amount_usd"] == 218
        assert f'"refund_id": "{record["refund_id"]}"' in rest
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.communicate(timeout=60)
    assert up.returncode == 0
