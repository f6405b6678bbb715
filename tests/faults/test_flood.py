"""A flood of bad input does not fail good work (issue 14, item 9).

Under 2,000 invalid submissions interleaved with 200 valid ones, 50 valid tasks failed
`no_agent` while every agent was alive: the orchestrator's registry view went stale with
its loop saturated, and a stale view failed a task after 30 s. Here every valid task must
complete. The full size is `slow`; the default suite runs a fifth of it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "orchestrator"))

from edge_agents import ECHO, ECHO_FLOW, stale_view

from jetmesh.bus import events as ev
from jetmesh.bus import subjects
from jetmesh.orchestrator.state import TaskStatus


def bad_body(i: int, marker: str) -> bytes:
    """Four kinds of invalid submission: not JSON, not an object, bad fields with no
    task id, bad fields with a new task id (which gets a `rejected` event)."""
    kind = i % 4
    if kind == 0:
        return b"{not json " + marker.encode()
    if kind == 1:
        return json.dumps(["a list", marker, i]).encode()
    if kind == 2:
        return json.dumps({"goal": 5, "input": "no", "n": i}).encode()
    return json.dumps({"task_id": f"bad-{marker}-{i}", "goal": 5}).encode()


async def flood(make_mesh, bus, n_bad: int, n_good: int, timeout: float) -> None:
    # A short explicit wait for an agent (JETMESH_NO_AGENT_WAIT_S), and a stale view:
    # the view alone must not fail a task even then.
    mesh = await make_mesh([ECHO], no_agent_wait_s=3.0)
    mesh.orchestrator.workflows.add(ECHO_FLOW)
    await stale_view(mesh.orchestrator)
    marker = ev.new_id()[:10]
    good: list[str] = []
    every = n_bad // n_good
    t0 = time.monotonic()
    futures = []
    for i in range(n_bad):
        futures.append(await bus.js.publish_async(subjects.SUBMIT, bad_body(i, marker)))
        if i % every == every - 1:
            tid = f"good-{marker}-{len(good)}"
            good.append(tid)
            body = {"task_id": tid, "goal": f"hello {len(good)}", "workflow": "edge-echo"}
            futures.append(await bus.js.publish_async(
                subjects.SUBMIT, json.dumps(body).encode(), headers={"Nats-Msg-Id": tid}))
    await asyncio.gather(*futures)
    states = await asyncio.gather(*(mesh.client.result(t, timeout=timeout) for t in good))
    took = time.monotonic() - t0
    by_status: dict[str, int] = {}
    for st in states:
        by_status[st.status.value] = by_status.get(st.status.value, 0) + 1
    print(f"flood {n_bad} bad + {n_good} good: {by_status} in {took:.1f}s")
    failed = [(st.task_id, st.code, st.reason) for st in states
              if st.status is not TaskStatus.COMPLETED]
    assert not failed, failed[:5]
    # The bad ones with a task id were rejected on their own (new) tasks.
    some = f"bad-{marker}-3"
    assert (await mesh.client.result(some, timeout=timeout)).status is TaskStatus.REJECTED


@pytest.mark.timeout(100)
async def test_a_flood_of_bad_submissions_does_not_fail_good_ones(make_mesh, bus) -> None:
    await flood(make_mesh, bus, 400, 40, timeout=80)


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_a_flood_of_2000_bad_submissions_does_not_fail_200_good_ones(make_mesh,
                                                                           bus) -> None:
    await flood(make_mesh, bus, 2000, 200, timeout=360)
