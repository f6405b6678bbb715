"""Support for the MCP tests: the fixture MCP server (servers/fixture_server.py, written
with the SDK) as a real subprocess, over stdio (started by the client) or streamable
HTTP (started here, on a free port); the test agent's spec."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from jetmesh.agents.mcp import HttpServer, McpServerConfig, StdioServer

SERVER = Path(__file__).parent / "servers" / "fixture_server.py"


@dataclass
class Fixture:
    """One fixture server's control directory."""

    dir: Path

    def calls(self, tool: str | None = None, **args: object) -> list[dict[str, object]]:
        """The real calls the server received (of ``tool``, with these arguments)."""
        log = self.dir / "calls.log"
        if not log.exists():
            return []
        rows = [json.loads(line) for line in log.read_text().splitlines() if line]
        return [r for r in rows if (tool is None or r["tool"] == tool)
                and all(r["args"].get(k) == v for k, v in args.items())]

    def clear(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)

    def set(self, name: str, value: str) -> None:
        (self.dir / name).write_text(value)

    def http_statuses(self) -> list[str]:
        log = self.dir / "http.log"
        return log.read_text().split() if log.exists() else []


@pytest.fixture
def fixture_dir(tmp_path: Path) -> Fixture:
    d = tmp_path / "fixture"
    d.mkdir()
    return Fixture(d)


def stdio_config(fx: Fixture, name: str = "fx", **kw: object) -> McpServerConfig:
    return McpServerConfig(name=name, transport=StdioServer(
        command=sys.executable, args=[str(SERVER), "stdio"],
        env={"FIXTURE_DIR": str(fx.dir)}), **kw)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HttpFixture(Fixture):
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None

    def config(self, name: str = "web", **kw: object) -> McpServerConfig:
        transport = kw.pop("transport", None) or HttpServer(url=self.url)
        return McpServerConfig(name=name, transport=transport, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpFixture]:
    """One HTTP fixture server for the session (tests tell their calls apart by their
    arguments, and clear the control files they set)."""
    tmp_path = tmp_path_factory.mktemp("mcp-http")
    d = tmp_path / "http-fixture"
    d.mkdir()
    port = _free_port()
    with (tmp_path / "http-server.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, str(SERVER), "http", str(port)],
                                env={**os.environ, "FIXTURE_DIR": str(d)}, stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while True:  # until the port accepts connections (the server is up)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError("the HTTP fixture server did not start") from None
            time.sleep(0.05)
    yield HttpFixture(d, url=f"http://127.0.0.1:{port}/mcp", proc=proc)
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- agents

ASK = "mcp_ask"
"""The skill of the test agent (its own work consumer on the shared server)."""


def agent_spec(stdio: McpServerConfig, http: McpServerConfig | None = None, *,
               name: str = "mcp-agent", skill: str = ASK) -> object:
    from jetmesh.agents.spec import AgentSpec, Limits, SkillSpec

    return AgentSpec(
        name=name, description="Uses tools of MCP servers.",
        instructions="Use the tools.",
        skills=[SkillSpec(id=skill, name="Ask", description="Answer with MCP tools.",
                          input_schema={"type": "object",
                                        "properties": {"question": {"type": "string"}}})],
        mcp_servers=[stdio] + ([http] if http is not None else []),
        limits=Limits(step_timeout_s=60))
