"""Smoke runs of the benchmark scripts: they start the real stack, run, verify, print."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_fanout_quick_prints_a_and_b_with_every_task_verified(tmp_path: Path) -> None:
    out = run("fanout.py", "--quick", "--workloads", "A,B", cwd=tmp_path)
    # workload, replicas, latency, in flight, tasks, tasks/s ...
    assert re.search(r"^A\s+1\s+0\s+1\s+30\s+\d+\.\d", out, re.M), out
    assert re.search(r"^B\s+1\s+20\s+50\s+30\s+\d+\.\d", out, re.M), out
    assert "warning/error lines in the children's logs over all runs: 0" in out


def test_steps_prints_the_hop_latencies_of_a_sequential_workflow(tmp_path: Path) -> None:
    out = run("steps.py", "--tasks", "3", "--warmup", "1", "--pause", "0.2", cwd=tmp_path)
    # 3 tasks x 3 hops between 4 steps, 3 x 4 dispatches, 3 spans
    assert re.search(r"^result -> next dispatch\s+n=\s+9\s+median\s+\d", out, re.M), out
    assert re.search(r"^dispatch -> step started\s+n=\s+12\s+median\s+\d", out, re.M), out
    assert re.search(r"^task \(first to last event\)\s+n=\s+3\s", out, re.M), out


def test_floor_sends_an_a_tasks_messages_and_prints_the_floor(tmp_path: Path) -> None:
    out = run("floor.py", "--tasks", "20", "--runs", "1", "--warmup", "2", cwd=tmp_path)
    m = re.search(r"CPU [\d.]+ ms/task .*?, ([\d.]+) msgs/task through nats-server", out)
    assert m, out
    # An A task's traffic: at least its appends, acks and deliveries (about 78 today).
    assert 60 < float(m.group(1)) < 120, out
    out = run("floor.py", "--tasks", "20", "--runs", "1", "--warmup", "2",
              "--add", "results-read", cwd=tmp_path)
    m2 = re.search(r"with: results-read;.*?, ([\d.]+) msgs/task through nats-server", out)
    assert m2, out
    assert float(m2.group(1)) > float(m.group(1)) + 5, out  # the read's messages
