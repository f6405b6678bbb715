"""The orchestrator's scripted model for the fan-out benchmark (planning and merging).

Loaded by the orchestrator process through the model factory:

    JETMESH_PLANNER_PROVIDER=sim JETMESH_PLANNER_MODEL=fanout_models:planner
    PYTHONPATH=<repo>/benchmarks

`planner()` is a zero-argument factory. Its model answers the two orchestrator calls of
the standard fan-out task (BENCHMARK.md), each after an ``asyncio.sleep`` of
``JETMESH_SIM_LATENCY_MS`` (the same latency the workers' SimModel uses):

- the plan call (`orchestrator/planner.py: plan_with_model`, recognised by its
  ``output_schema``): one `order_status` step per id in the task input's ``order_ids``,
  with ``merge: true``;
- the merge call (`merge_with_model`): a text that holds every step's output, verbatim.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from jetmesh.agents.models.sim import FunctionModel
from jetmesh.agents.models.types import ModelRequest


def _payload(request: ModelRequest) -> dict[str, Any]:
    first = next((m.content for m in request.messages if m.role == "user"), "")
    try:
        data = json.loads(first)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def plan_answer(request: ModelRequest) -> str:
    """Three (or however many ids there are) concurrent order_status steps, merged."""
    ids = _payload(request).get("input", {}).get("order_ids", [])
    steps = [{"id": f"s{i + 1}", "skill": "order_status", "input": {"order_id": oid}}
             for i, oid in enumerate(ids)]
    return json.dumps({"steps": steps, "merge": True})


def merge_answer(request: ModelRequest) -> str:
    """Every step's result, verbatim, in one answer."""
    results = _payload(request).get("results", {})
    return "Merged results of the order agents: " + json.dumps(results, sort_keys=True)


def planner() -> FunctionModel:
    latency_s = float(os.environ.get("JETMESH_SIM_LATENCY_MS", "0") or 0) / 1000

    async def answer(request: ModelRequest) -> str:
        if latency_s > 0:
            await asyncio.sleep(latency_s)
        if request.output_schema is not None:
            return plan_answer(request)
        return merge_answer(request)

    return FunctionModel(answer, name="fanout-planner", provider="sim")
