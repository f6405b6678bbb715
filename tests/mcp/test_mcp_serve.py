"""`jetmesh mcp serve` as a real process, driven by the official SDK client: the mesh's
tools, a workflow run to completion with progress notifications, an approval answered as
an input request (elicitation), tasks as resources."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from mcp import Client, StdioServerParameters
from mcp.types import ElicitResult
from mcp_support import Fixture, agent_spec, stdio_config

from jetmesh.agents.models.sim import ScriptedModel
from jetmesh.agents.models.types import ToolCall

ORDERS = ["A1001", "A1002", "A1003"]


def serve_params(url: str, cwd: Path) -> StdioServerParameters:
    # cwd outside the repository: its a2a/ folder would shadow the A2A SDK.
    return StdioServerParameters(
        command=sys.executable, args=["-m", "jetmesh.orchestrator.cli", "mcp", "serve",
                                      "--url", url],
        cwd=str(cwd), env={k: v for k, v in os.environ.items()
                           if k.startswith(("JETMESH_", "PATH", "HOME"))})


async def test_sdk_client_lists_the_mesh_tools_and_runs_a_workflow_with_progress(
        make_mesh, bus, tmp_path: Path) -> None:
    mesh = await make_mesh(["support"])
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append((p, total, message))

    async with Client(serve_params(bus.url, tmp_path), read_timeout_seconds=60) as client:
        assert client.protocol_version == "2026-07-28"
        listed = await client.list_tools()
        tools = {t.name: t for t in listed.tools}
        assert {"skill_order_status", "workflow_fanout", "workflow_support",
                "task_status", "approve"} <= set(tools)
        assert "order_id" in tools["skill_order_status"].input_schema["properties"]
        assert listed.ttl_ms == 2000  # agents come and go: a short cache hint
        result = await client.call_tool(
            "workflow_fanout", {"goal": "where are my orders?", "input": {"order_ids": ORDERS}},
            progress_callback=on_progress)
        assert not result.is_error, result.content
        out = result.structured_content or {}
        assert out["status"] == "completed" and out["result"]
        assert sorted(out["steps"]) == ["order0", "order1", "order2"]
        # One notification per step that ended, of the three.
        assert [p for p, _, _ in progress] == [1, 2, 3] and {t for _, t, _ in progress} == {3}
        # The task as a resource.
        task_id = out["task_id"]
        read = await client.read_resource(f"jetmesh://tasks/{task_id}")
        assert '"status": "completed"' in read.contents[0].text  # type: ignore[union-attr]
        state = await mesh.client.state(task_id)
        assert state.submitted is not None and state.submitted.metadata["via"] == "mcp"
        # One skill as one tool.
        one = await client.call_tool("skill_order_status", {"order_id": "A1002"})
        assert not one.is_error and (one.structured_content or {})["status"] == "completed"


async def test_an_approval_is_answered_as_an_input_request(
        make_mesh, bus, fixture_dir: Fixture, tmp_path: Path) -> None:
    args = {"amount": 70, "to": "bob"}
    model = ScriptedModel(ToolCall(id="c1", name="fx__transfer", arguments=args), "sent")
    spec = agent_spec(stdio_config(fixture_dir, irreversible=["transfer"]), name="mcp-served",
                      skill="mcp_served")
    await make_mesh([spec], worker_model=model)
    asked: list[str] = []

    async def elicit(ctx: object, params: object) -> ElicitResult:
        asked.append(params.message)  # type: ignore[attr-defined]
        return ElicitResult(action="accept", content={"approve": True})

    async with Client(serve_params(bus.url, tmp_path), read_timeout_seconds=60,
                      elicitation_callback=elicit) as client:  # type: ignore[arg-type]
        result = await client.call_tool("skill_mcp_served", {"question": "pay bob"})
    assert not result.is_error, result.content
    assert (result.structured_content or {})["status"] == "completed"
    assert len(asked) == 1 and "fx__transfer" in asked[0] and '"amount": 70' in asked[0]
    assert [c["args"] for c in fixture_dir.calls("transfer")] == [args]  # approved, ran once
    model.assert_complete()
