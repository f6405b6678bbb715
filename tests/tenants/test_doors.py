"""Tenant B's credentials against tenant A's task through the gateway's other doors: MCP
at /mcp (the official SDK client, with the gateway's API keys) and the dashboard (/ui,
logged in with the same keys), and `jetmesh mcp serve` over stdio as an API key.
Generated from a permission table: 0 allowed; the same doors serve tenant A's own users
(the table's positive side), and what they do is recorded with their identity."""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mcp import Client as McpClient
from mcp import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from test_gateway_auth import api, gateway, key_of  # noqa: F401 (the fixture)

from jetmesh.a2a.auth import Identity
from jetmesh.a2a.gateway import MCP_PATH
from jetmesh.a2a.mcp_server import MeshMcpServer
from jetmesh.bus import events as ev


@contextlib.asynccontextmanager
async def mcp_as(base: str, who: str) -> AsyncIterator[McpClient]:
    async with create_mcp_http_client(headers={"X-API-Key": key_of(who)}) as http, \
            McpClient(streamable_http_client(base + MCP_PATH, http_client=http),
                      read_timeout_seconds=60) as client:
        yield client


@contextlib.asynccontextmanager
async def ui_as(base: str, who: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base + "/ui", timeout=30) as c:
        r = await c.post("/api/login", json={"token": key_of(who)})
        assert r.status_code == 200, r.text
        c.headers["X-CSRF-Token"] = c.cookies["jm_csrf"]
        yield c


@dataclass
class Victim:
    task: str
    step_id: str
    tool: str
    args_hash: str


@dataclass
class Doors:
    base: str
    """The gateway's base URL."""
    client: Any
    """The mesh's client (to look at what a probe did)."""
    mcp_tasks: list[str]
    """Tasks the MCP probes submitted."""


Probe = Callable[[Doors, str, Victim], Awaitable[bool]]
"""(the doors, who, A's task) -> whether `who` got access."""


async def _mcp_status(d: Doors, who: str, v: Victim) -> bool:
    async with mcp_as(d.base, who) as c:
        out = await c.call_tool("task_status", {"task_id": v.task})
    return not out.is_error and (out.structured_content or {}).get("task_id") == v.task


async def _mcp_resource(d: Doors, who: str, v: Victim) -> bool:
    async with mcp_as(d.base, who) as c:
        try:
            read = await c.read_resource(f"jetmesh://tasks/{v.task}")
        except Exception:
            return False
    return v.task in read.contents[0].text  # type: ignore[union-attr]


async def _mcp_approve(d: Doors, who: str, v: Victim) -> bool:
    """Only probed with approvers who must be refused (it would decide A's call)."""
    async with mcp_as(d.base, who) as c:
        try:
            out = await c.call_tool("approve", {"task_id": v.task, "approve": True,
                                                "args_hash": v.args_hash})
        except Exception:  # the gateway's 403 (a role that may not approve)
            return False
    return not out.is_error


async def _mcp_submit_for_a(d: Doors, who: str, v: Victim) -> bool:
    """A task submitted over MCP belongs to the caller's tenant: access to A's tenant if
    it is A's."""
    async with mcp_as(d.base, who) as c:
        try:
            out = await c.call_tool("skill_lookup_order", {"order_id": "A1001"})
        except Exception:
            return False
    task = (out.structured_content or {}).get("task_id")
    if out.is_error or not task:
        return False
    d.mcp_tasks.append(task)
    state = await d.client.state(task)
    return state.submitted is not None and state.submitted.tenant == "t-a"


async def _ui_get(d: Doors, who: str, v: Victim) -> bool:
    async with ui_as(d.base, who) as c:
        return (await c.get(f"/api/tasks/{v.task}")).status_code == 200


async def _ui_list(d: Doors, who: str, v: Victim) -> bool:
    async with ui_as(d.base, who) as c:
        rows = (await c.get("/api/tasks", params={"limit": 500})).json()["tasks"]
    return any(r["task_id"] == v.task for r in rows)


async def _ui_approvals(d: Doors, who: str, v: Victim) -> bool:
    async with ui_as(d.base, who) as c:
        rows = (await c.get("/api/approvals")).json()["approvals"]
    return any(r["task_id"] == v.task for r in rows)


async def _ui_live(d: Doors, who: str, v: Victim) -> bool:
    async with ui_as(d.base, who) as c, c.stream("GET", f"/api/tasks/{v.task}/live") as r:
        return r.status_code == 200


async def _ui_post(d: Doors, who: str, path: str, body: dict[str, Any]) -> bool:
    async with ui_as(d.base, who) as c:
        r = await c.post(path, json=body)
    return r.status_code == 200


async def _ui_approve(d: Doors, who: str, v: Victim) -> bool:
    return await _ui_post(d, who, f"/api/tasks/{v.task}/approve",
                          {"step_id": v.step_id, "tool": v.tool,
                           "args_hash": v.args_hash})


async def _ui_deny(d: Doors, who: str, v: Victim) -> bool:
    return await _ui_post(d, who, f"/api/tasks/{v.task}/deny",
                          {"step_id": v.step_id, "tool": v.tool,
                           "args_hash": v.args_hash, "reason": "no"})


async def _ui_cancel(d: Doors, who: str, v: Victim) -> bool:
    return await _ui_post(d, who, f"/api/tasks/{v.task}/cancel", {"reason": "mine now"})


async def _ui_replay(d: Doors, who: str, v: Victim) -> bool:
    """A replay is a new task spending on the original's behalf."""
    return await _ui_post(d, who, f"/api/tasks/{v.task}/replay", {})


async def _ui_stats(d: Doors, who: str, v: Victim) -> bool:
    async with ui_as(d.base, who) as c:
        return (await c.get("/api/stats")).status_code == 200


async def _ui_dead_letters(d: Doors, who: str, v: Victim) -> bool:
    async with ui_as(d.base, who) as c:
        return (await c.get("/api/dlq")).status_code == 200


@dataclass(frozen=True)
class Row:
    action: str
    door: str
    probe: Probe
    others: tuple[str, ...]
    """Tenant B's users who try it (bob: submitter, bert: approver)."""
    owner: str | None
    """Tenant A's user who may do it (None: not probed on the positive side: it would
    change A's task)."""


TABLE = [
    Row("read", "MCP task_status", _mcp_status, ("bob", "bert"), "alice"),
    Row("read", "MCP resource jetmesh://tasks/<id>", _mcp_resource, ("bob", "bert"), "rita"),
    Row("approve", "MCP approve", _mcp_approve, ("bob", "bert"), None),
    Row("submit", "MCP skill call (into A's tenant)", _mcp_submit_for_a, ("bob",), "alice"),
    Row("read", "dashboard task view", _ui_get, ("bob", "bert"), "rita"),
    Row("read", "dashboard task list", _ui_list, ("bob", "bert"), "rita"),
    Row("read", "dashboard approvals inbox", _ui_approvals, ("bob", "bert"), "carol"),
    Row("read", "dashboard task live events", _ui_live, ("bob", "bert"), "rita"),
    Row("read", "dashboard stats (every tenant's)", _ui_stats, ("bob", "bert"), None),
    Row("read", "dashboard dead letters", _ui_dead_letters, ("bob", "bert"), None),
    Row("approve", "dashboard approve", _ui_approve, ("bert",), None),
    Row("approve", "dashboard deny", _ui_deny, ("bert",), None),
    Row("cancel", "dashboard cancel", _ui_cancel, ("bert",), None),
    Row("spend", "dashboard replay of A's task", _ui_replay, ("bert",), None),
]


async def test_tenant_b_reaches_nothing_of_tenant_a_over_mcp_and_the_dashboard(
        gateway, bus, tmp_path: Path) -> None:  # noqa: F811
    mesh, _ = gateway
    try:
        await _doors(mesh, bus)
        await _stdio(mesh, bus, tmp_path)
    finally:  # its role logins (the approver's) close with it, before the gateway's
        await _dashboard(mesh).stop()


def _dashboard(mesh: Any) -> Any:
    from jetmesh.a2a.ui import Dashboard

    assert mesh.gateway._server is not None
    for route in mesh.gateway._server.config.app.routes:
        if getattr(route, "name", None) == "ui":
            dash = route.app.state.dashboard
            assert isinstance(dash, Dashboard)
            return dash
    raise AssertionError("no /ui mount")


async def _doors(mesh: Any, bus: Any) -> None:
    base = mesh.base
    doors = Doors(base, mesh.gateway.client, [])
    # Tenant A's refund waits for an approval: the task B goes for.
    body = {"jsonrpc": "2.0", "id": 3, "method": "SendMessage", "params": {
        "message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
                    "parts": [{"text": "refund my teapot"}],
                    "metadata": {"skill": "auth_refund"}},
        "configuration": {"returnImmediately": False}}}
    async with httpx.AsyncClient(timeout=30) as http:
        task = (await http.post(f"{base}/", json=body, headers=api("alice"))).json()[
            "result"]["task"]
    assert task["status"]["state"] == "TASK_STATE_INPUT_REQUIRED", task
    state = await mesh.gateway.client.state(task["id"])
    (pending,) = state.pending_approvals.values()
    victim = Victim(task["id"], pending.step_id, pending.tool, pending.args_hash)
    before = len(await bus.ledger.read(victim.task))

    allowed = [f"{row.action}: {row.door} as {who}" for row in TABLE for who in row.others
               if await row.probe(doors, who, victim)]
    assert allowed == [], allowed
    assert len(await bus.ledger.read(victim.task)) == before  # nothing decided or canceled
    owner = {row.door: await row.probe(doors, row.owner, victim) for row in TABLE
             if row.owner is not None}
    assert owner == {row.door: True for row in TABLE if row.owner is not None}, owner
    # A's approver approves in the dashboard, recorded as who they are.
    assert await _ui_approve(doors, "carol", victim)
    granted = [e.event for e in await bus.ledger.read(victim.task)
               if isinstance(e.event, ev.ApprovalGranted)]
    assert [g.data.by for g in granted] == ["ui:api-key:carol"]
    # A task submitted over MCP by A's submitter is A's, submitted by them.
    submitted = [(await doors.client.state(t)).submitted for t in doors.mcp_tasks]
    assert {(s.tenant, s.submitted_by) for s in submitted if s is not None} == {
        ("t-a", "api-key:alice"), ("t-b", "api-key:bob")}


async def _stdio(mesh: Any, bus: Any, tmp_path: Path) -> None:
    """`jetmesh mcp serve` (stdio) with JETMESH_API_KEY: tenant B's submitter does not
    find A's task, its own calls are B's and recorded as it; a reader may not submit."""
    client = mesh.gateway.client
    theirs = await client.submit("A1001", workflow="skill:lookup_order",
                                 input={"order_id": "A1001"}, tenant="t-a",
                                 submitted_by="api-key:alice")

    def params(who: str) -> StdioServerParameters:
        env = {k: v for k, v in os.environ.items() if k.startswith(("JETMESH_", "PATH", "HOME"))}
        # cwd outside the repository: its a2a/ folder would shadow the A2A SDK.
        return StdioServerParameters(
            command=sys.executable, args=["-m", "jetmesh.orchestrator.cli", "mcp", "serve",
                                          "--url", bus.url],
            cwd=str(tmp_path), env={**env, "JETMESH_API_KEY": key_of(who)})

    async with McpClient(params("bob"), read_timeout_seconds=60) as c:
        status = await c.call_tool("task_status", {"task_id": theirs})
        assert status.is_error and "no task" in status.content[0].text  # type: ignore[union-attr]
        mine = await c.call_tool("skill_lookup_order", {"order_id": "A1002"})
    out = mine.structured_content or {}
    assert out.get("status") == "completed", mine.content
    sub = (await client.state(out["task_id"])).submitted
    assert sub is not None and (sub.tenant, sub.submitted_by) == ("t-b", "api-key:bob")
    # The role check of a fixed identity, in process (the same server, no subprocess).
    gw_mcp = mesh.gateway.mcp
    rita = MeshMcpServer(client, gw_mcp.registry, gw_mcp.workflows,
                         identity=Identity("rita", "t-a", "reader", "api-key"))
    async with McpClient(rita.server, read_timeout_seconds=60) as c:
        refused = await c.call_tool("skill_lookup_order", {"order_id": "A1003"})
        assert refused.is_error and "may not" in refused.content[0].text  # type: ignore[union-attr]
        seen = await c.call_tool("task_status", {"task_id": theirs})
        assert not seen.is_error  # rita reads tenant A's tasks


async def test_a_tenants_private_agent_is_shown_to_it_and_to_no_other_tenant(
        gateway) -> None:  # noqa: F811
    """Discovery through every door: the public mesh card, the agent's own card, MCP's
    tool list (and a call of it), the dashboard's agents. Tenant t-a's user sees its
    private agent; tenant t-b's does not, nor does the public card."""
    mesh, _ = gateway
    base = mesh.base
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            card = (await http.get(f"{base}/.well-known/agent-card.json")).json()
            assert "ta_books" not in {s["id"] for s in card["skills"]}
            assert "lookup_order" in {s["id"] for s in card["skills"]}
            own = await http.get(f"{base}/agents/ta-books/.well-known/agent-card.json",
                                 headers={"X-API-Key": key_of("alice")})
            other = await http.get(f"{base}/agents/ta-books/.well-known/agent-card.json",
                                   headers={"X-API-Key": key_of("bob")})
        assert own.status_code == 200 and own.json()["name"] == "ta-books"
        assert own.headers["cache-control"].startswith("private")
        assert other.status_code == 404
        seen: dict[str, set[str]] = {}
        for who in ("alice", "bob"):
            async with mcp_as(base, who) as c:
                seen[who] = {t.name for t in (await c.list_tools()).tools}
        assert "skill_ta_books" in seen["alice"] and "skill_ta_books" not in seen["bob"]
        assert "skill_lookup_order" in seen["alice"] & seen["bob"]
        async with mcp_as(base, "bob") as c:
            out = await c.call_tool("skill_ta_books", {"q": "their books"})
        assert out.is_error
        listed: dict[str, set[str]] = {}
        for who in ("alice", "bob"):
            async with ui_as(base, who) as c:
                listed[who] = {a["name"] for a in (await c.get("/api/agents")).json()["agents"]}
        assert "ta-books" in listed["alice"] and "ta-books" not in listed["bob"]
    finally:
        await _dashboard(mesh).stop()
