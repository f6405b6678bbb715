"""`jetmesh mcp serve` as a real process, driven by the official SDK client: the mesh's
tools, a workflow run to completion with progress notifications, an approval answered as
an input request (elicitation), tasks as resources."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from mcp import Client, StdioServerParameters
from mcp.types import ElicitResult
from mcp_support import Fixture, agent_spec, stdio_config
from mesh_fixtures import wait_live

from jetmesh.agents.models.sim import ScriptedModel
from jetmesh.agents.models.types import ToolCall
from jetmesh.agents.worker import Worker
from jetmesh.bus.connection import connect, jetstream

ORDERS = ["A1001", "A1002", "A1003"]


def serve_params(url: str, cwd: Path) -> StdioServerParameters:
    # cwd outside the repository: its a2a/ folder would shadow the A2A SDK.
    return StdioServerParameters(
        command=sys.executable, args=["-m", "jetmesh.orchestrator.cli", "mcp", "serve",
                                      "--url", url],
        cwd=str(cwd), env={k: v for k, v in os.environ.items()
                           if k.startswith(("JETMESH_", "PATH", "HOME"))})


async def test_sdk_client_runs_the_mesh_through_jetmesh_mcp_serve(
        make_mesh, bus, fixture_dir: Fixture, tmp_path: Path) -> None:
    args = {"amount": 70, "to": "bob"}
    model = ScriptedModel(ToolCall(id="c1", name="fx__transfer", arguments=args), "sent")
    gated = agent_spec(stdio_config(fixture_dir, irreversible=["transfer"]), name="mcp-served",
                       skill="mcp_served")
    mesh = await make_mesh(["support"])  # the support agent on the sim model
    wnc = await connect(bus.url)
    worker = Worker(gated, model, wnc, jetstream(wnc), replica="mcp-served-test")
    await worker.start()
    mesh.workers.append(worker)  # stopped with the mesh
    await wait_live(bus.js, {"mcp-served"})
    progress: list[tuple[float, float | None, str | None]] = []
    asked: list[str] = []

    async def on_progress(p: float, total: float | None, message: str | None) -> None:
        progress.append((p, total, message))

    async def elicit(ctx: object, params: object) -> ElicitResult:
        asked.append(params.message)  # type: ignore[attr-defined]
        return ElicitResult(action="accept", content={"approve": True})

    async with Client(serve_params(bus.url, tmp_path), read_timeout_seconds=60,
                      elicitation_callback=elicit) as client:  # type: ignore[arg-type]
        assert client.protocol_version == "2026-07-28"
        listed = await client.list_tools()
        tools = {t.name: t for t in listed.tools}
        assert {"skill_order_status", "skill_mcp_served", "workflow_fanout",
                "workflow_support", "task_status", "approve"} <= set(tools)
        assert "order_id" in tools["skill_order_status"].input_schema["properties"]
        assert listed.ttl_ms == 2000  # agents come and go: a short cache hint
        # A declared workflow, run to completion, with a progress notification per step.
        result = await client.call_tool(
            "workflow_fanout", {"goal": "where are my orders?", "input": {"order_ids": ORDERS}},
            progress_callback=on_progress)
        assert not result.is_error, result.content
        out = result.structured_content or {}
        assert out["status"] == "completed" and out["result"]
        assert sorted(out["steps"]) == ["order0", "order1", "order2"]
        assert [p for p, _, _ in progress] == [1, 2, 3] and {t for _, t, _ in progress} == {3}
        # The task as a resource.
        task_id = out["task_id"]
        read = await client.read_resource(f"jetmesh://tasks/{task_id}")
        assert '"status": "completed"' in read.contents[0].text  # type: ignore[union-attr]
        state = await mesh.client.state(task_id)
        assert state.submitted is not None and state.submitted.metadata["via"] == "mcp"
        # A skill whose MCP tool is irreversible: its approval is an input request the
        # client answers; the approved call runs, once.
        gated_result = await client.call_tool("skill_mcp_served", {"question": "pay bob"})
    assert not gated_result.is_error, gated_result.content
    assert (gated_result.structured_content or {})["status"] == "completed"
    assert len(asked) == 1 and "fx__transfer" in asked[0] and '"amount": 70' in asked[0]
    assert [c["args"] for c in fixture_dir.calls("transfer")] == [args]
    model.assert_complete()


def _spawn_http_serve(url: str, port: int, cwd: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "JETMESH_GATEWAY_APPROVER_TOKEN": "let-me-approve"}
    with (cwd / "serve.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "jetmesh.orchestrator.cli", "mcp", "serve", "--url", url,
             "--http", f"127.0.0.1:{port}"], cwd=cwd, env=env, stdout=log,
            stderr=subprocess.STDOUT)


async def test_mcp_serve_over_streamable_http_needs_the_approver_token(
        make_mesh, bus, tmp_path: Path) -> None:
    import socket

    await make_mesh(["support"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _spawn_http_serve(bus.url, port, tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        for _ in range(400):  # until it accepts connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert proc.poll() is None, "jetmesh mcp serve --http exited"
                await asyncio.sleep(0.05)
        async with Client(url, read_timeout_seconds=60) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"skill_order_status", "workflow_fanout", "approve"} <= tools
            out = await client.call_tool("approve", {"task_id": "nope", "approve": True})
            assert out.is_error and "approver's token" in out.content[0].text  # type: ignore[union-attr]
            status = await client.call_tool("skill_order_status", {"order_id": "A1001"})
            assert (status.structured_content or {})["status"] == "completed"
    finally:
        proc.terminate()
        proc.wait(10)


async def test_the_gateway_serves_the_mesh_over_mcp(make_mesh, bus) -> None:
    """Streamable HTTP through the gateway at /mcp: the SDK client lists the tools and
    runs a skill; an approval without the gateway's approver token is refused."""
    from jetmesh.a2a.gateway import MCP_PATH, GatewayServer, GatewaySettings

    await make_mesh(["support"])
    gateway = GatewayServer(bus.url, settings=GatewaySettings(port=0, agent_ttl_s=3))
    base = await gateway.start()
    try:
        async with Client(base + MCP_PATH, read_timeout_seconds=60) as client:
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"skill_order_status", "workflow_fanout", "approve"} <= tools
            out = await client.call_tool("approve", {"task_id": "nope", "approve": True})
            assert out.is_error and "approver's token" in out.content[0].text  # type: ignore[union-attr]
            status = await client.call_tool("skill_order_status", {"order_id": "A1001"})
            assert (status.structured_content or {})["status"] == "completed"
    finally:
        await gateway.stop()
