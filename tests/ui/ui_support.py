"""The dashboard tests' mesh and helpers (the fixtures that build it are in conftest)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import BaseModel

from jetmesh.a2a.gateway import GatewayServer
from jetmesh.agents.builtin.support import issue_refund
from jetmesh.agents.models.sim import tool_call
from jetmesh.agents.models.types import ModelRequest, ToolCall
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import events as ev
from jetmesh.bus.events import PlanStep
from jetmesh.orchestrator.client import Client
from jetmesh.orchestrator.workflows import Workflow

APPROVER_TOKEN = "tok-alice-approver"
READER_TOKEN = "tok-bob-reader"
TOKENS = f"alice:approver:{APPROVER_TOKEN},bob:read-only:{READER_TOKEN}"
TRACE_URL = "http://traces.test/trace/{trace_id}"


class Question(BaseModel):
    question: str


def refunding(request: ModelRequest) -> list[ToolCall] | str:
    """Refunds the amount named in the question on order A1029, then reports."""
    tools = [m for m in request.messages if m.role == "tool"]
    if not tools:
        text = " ".join(m.content for m in request.messages if m.role == "user")
        amount = float(re.search(r"refund (\d+)", text).group(1))  # type: ignore[union-attr]
        return [tool_call("issue_refund", order_id="A1029", amount_usd=amount,
                          reason="customer asked")]
    return "done: " + tools[-1].content[:200]


@dataclass
class Gates:
    """The waiting agent's model answers a question only once the test opens its gate."""

    opened: dict[str, asyncio.Event] = field(default_factory=dict)
    started: dict[str, asyncio.Event] = field(default_factory=dict)

    def gate(self, name: str) -> asyncio.Event:
        return self.opened.setdefault(name, asyncio.Event())

    def start(self, name: str) -> asyncio.Event:
        return self.started.setdefault(name, asyncio.Event())

    async def model(self, request: ModelRequest) -> str:
        text = " ".join(m.content for m in request.messages if m.role == "user")
        name = re.search(r"gate (\w+)", text).group(1)  # type: ignore[union-attr]
        self.start(name).set()
        await self.gate(name).wait()
        return f"answered {name}"


REFUNDER = AgentSpec(
    name="refunder", description="Refunds orders.", instructions="Refund as asked.",
    tools=[issue_refund],
    skills=[SkillSpec.from_models("refund_ui", "Refund", "Refunds an order.",
                                  input_model=Question)])
WAITER = AgentSpec(
    name="waiter", description="Answers when told to.", instructions="Wait.",
    skills=[SkillSpec.from_models("wait_ui", "Wait", "Waits for its gate.",
                                  input_model=Question)])


def one_step(name: str, skill: str) -> Workflow:
    return Workflow(name=name, steps=[PlanStep(id="only", skill=skill,
                                               input={"question": {"$ref": "task.goal"}})])


def two_steps(name: str, skill: str) -> Workflow:
    return Workflow(name=name, steps=[
        PlanStep(id="first", skill=skill, input={"question": {"$ref": "task.goal"}}),
        PlanStep(id="second", skill=skill, depends_on=["first"],
                 input={"question": {"$ref": "task.input.then"}})])


@dataclass
class UiMesh:
    url: str
    base: str
    """The gateway's base URL (the dashboard is at base + /ui)."""
    client: Client
    gates: Gates
    data_dir: Path
    gateway: GatewayServer

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base + "/ui", timeout=30)

    @contextlib.asynccontextmanager
    async def session(self, token: str) -> AsyncIterator[httpx.AsyncClient]:
        """An HTTP client logged in with `token`, sending its CSRF header."""
        async with self.http() as c:
            r = await c.post("/api/login", json={"token": token})
            assert r.status_code == 200, r.text
            c.headers["X-CSRF-Token"] = c.cookies["jm_csrf"]
            yield c

    async def wait_status(self, task_id: str, *statuses: str, timeout: float = 30) -> None:
        """Until the task's summary in the projection has one of `statuses` (follows the
        dashboard's own live list, no polling)."""
        dash = self.dashboard()
        await dash.start()
        assert dash.index is not None

        async def wait() -> None:
            version = -1
            while True:
                s = dash.index.tasks.get(task_id)
                if s is not None and s.status.value in statuses:
                    return
                version, _ = await dash.index.changes_after(
                    max(version, dash.index.version), 5)
        await asyncio.wait_for(wait(), timeout)

    def dashboard(self):  # type: ignore[no-untyped-def]
        from jetmesh.a2a.ui import Dashboard

        assert self.gateway._server is not None
        app = self.gateway._server.config.app
        for route in app.routes:
            if getattr(route, "name", None) == "ui":
                dash = route.app.state.dashboard
                assert isinstance(dash, Dashboard)
                return dash
        raise AssertionError("no /ui mount")


async def wait_event(client: Client, task_id: str, kind: type[ev.Event],
                     timeout: float = 30) -> ev.Event:
    async def wait() -> ev.Event:
        async for entry in client.follow(task_id):
            if isinstance(entry.event, kind):
                return entry.event
        raise AssertionError(f"task {task_id} ended without {kind.__name__}")
    return await asyncio.wait_for(wait(), timeout)
