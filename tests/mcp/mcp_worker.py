"""A worker process for the kill test: the MCP agent, with a model that calls
``fx__lookup`` and ``web__write_note`` and then answers, or (with ``MCP_TEST_HANG``
set) writes that file and hangs before answering, to be killed there."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mcp_support import HttpServer, McpServerConfig, StdioServer, agent_spec

from jetmesh.agents.models.sim import FunctionModel
from jetmesh.agents.models.types import ModelRequest, ToolCall
from jetmesh.agents.worker import Worker
from jetmesh.bus.connection import connect, jetstream

SERVER = Path(__file__).parent / "servers" / "fixture_server.py"


async def turn(request: ModelRequest) -> object:
    if not any(m.role == "tool" for m in request.messages):
        return [ToolCall(id="c1", name="fx__lookup", arguments={"key": "alpha"}),
                ToolCall(id="c2", name="web__write_note", arguments={"text": "kill test"})]
    hang = os.environ.get("MCP_TEST_HANG")
    if hang:
        await asyncio.to_thread(Path(hang).write_text, "at the final turn")
        await asyncio.Event().wait()
    return "noted: " + " | ".join(m.content[-40:] for m in request.messages if m.role == "tool")


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stdio = McpServerConfig(name="fx", read_only=["lookup"], transport=StdioServer(
        command=sys.executable, args=[str(SERVER), "stdio"],
        env={"FIXTURE_DIR": os.environ["FIXTURE_DIR"]}))
    http = McpServerConfig(name="web", transport=HttpServer(url=os.environ["HTTP_URL"]))
    spec = agent_spec(stdio, http, name="mcp-kill", skill="mcp_kill")
    nc = await connect(os.environ["NATS_URL"], name=f"jetmesh-agent-{spec.name}")
    worker = Worker(spec, FunctionModel(turn), nc, jetstream(nc))  # type: ignore[arg-type]
    await worker.start()
    await asyncio.Event().wait()  # serves until the test kills this process


if __name__ == "__main__":
    asyncio.run(main())
