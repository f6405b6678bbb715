"""The authenticated gateway: API keys and JWTs (a JWKS) mapped to a tenant and a role,
declared in the card; missing, expired and wrong-tenant credentials refused; the
identity on the ledger; tenant B cannot read, list, cancel or answer tenant A's tasks."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

sys.path.insert(0, str(Path(__file__).parents[1] / "a2a"))
from a2a_mesh import Mesh

from jetmesh.a2a.auth import (
    ApiKey,
    AuthSettings,
    JwtSettings,
    allowed,
    hash_key,
    operation_of,
)
from jetmesh.a2a.gateway import GatewaySettings
from jetmesh.agents.builtin import get_agent
from jetmesh.agents.builtin.support import issue_refund
from jetmesh.agents.models.sim import FunctionModel, tool_call
from jetmesh.agents.models.types import ModelRequest, ToolCall
from jetmesh.agents.spec import AgentSpec, SkillSpec
from jetmesh.bus import events as ev

KEYS = {"alice": ("t-a", "submitter"), "bob": ("t-b", "submitter"),
        "rita": ("t-a", "reader"), "root": (None, "admin"),
        "carol": ("t-a", "approver"), "bert": ("t-b", "approver")}
TOKEN = "approver-secret"


def refund_then_answer(request: ModelRequest) -> list[ToolCall] | str:
    """A $230 refund (over the approval threshold), then the outcome."""
    told = [m for m in request.messages if m.role == "tool"]
    if not told:
        return [tool_call("issue_refund", order_id="A1029", amount_usd=230,
                          reason="damaged on arrival")]
    return "outcome: " + told[-1].content[:200]


REFUNDER = AgentSpec(name="auth-refunder", description="Refunds A1029.",
                     instructions="Refund.", tools=[issue_refund],
                     skills=[SkillSpec(id="auth_refund", name="Refund", description="r")])
PRIVATE = AgentSpec(name="ta-books", description="Tenant t-a's own bookkeeper.",
                    instructions="Keep books.", tenants=["t-a"],
                    skills=[SkillSpec(id="ta_books", name="Books", description="b")])
"""A private agent of tenant t-a: the other tenants' doors do not show it."""
ISSUER, AUDIENCE = "https://issuer.test", "jetmesh"
H = {"A2A-Version": "1.0"}


def key_of(name: str) -> str:
    return f"k-{name}-secret"


class Jwks:
    """The issuer: an RSA key, its JWKS served over HTTP, tokens signed with it."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        self.body = json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig",
                                          "alg": "RS256"}]}).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     + f"content-length: {len(self.body)}\r\n\r\n".encode() + self.body)
        await writer.drain()
        writer.close()

    def token(self, sub: str, *, tenant: str | None = "t-a", role: str | None = "submitter",
              exp_in: float = 300, issuer: str = ISSUER) -> str:
        claims: dict[str, Any] = {"sub": sub, "iss": issuer, "aud": AUDIENCE,
                                  "exp": int(time.time() + exp_in)}
        if tenant:
            claims["tenant"] = tenant
        if role:
            claims["scope"] = f"openid {role}"
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": "k1"})


@pytest.fixture
async def gateway(bus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[tuple[Mesh, Jwks]]:
    issuer = Jwks()
    server = await asyncio.start_server(issuer.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = AuthSettings(
        api_keys=[ApiKey(sha256=hash_key(key_of(n)), subject=n, tenant=t, role=r)  # type: ignore[arg-type]
                  for n, (t, r) in KEYS.items()],
        jwt=JwtSettings(jwks_url=f"http://127.0.0.1:{port}/jwks.json", issuer=ISSUER,
                        audience=AUDIENCE, role_claim="scope",
                        token_url="https://issuer.test/oauth/token"))
    path = tmp_path / "auth.json"
    path.write_text(settings.model_dump_json())
    monkeypatch.setenv("JETMESH_GATEWAY_AUTH_FILE", str(path))
    monkeypatch.setenv("JETMESH_DATA_DIR", str(tmp_path))
    mesh = Mesh(bus.url, [get_agent("orders"), REFUNDER, PRIVATE],
                models={"auth-refunder": FunctionModel(refund_then_answer)},
                gateway_settings=GatewaySettings(port=0, agent_ttl_s=3, send_wait_s=15,
                                                 approver_token=TOKEN))
    await mesh.start()
    reg = mesh.gateway.registry
    assert reg is not None
    for _ in range(100):
        if {"lookup_order", "auth_refund", "ta_books"} <= set(reg.skills()):
            break
        await asyncio.sleep(0.05)  # the registry's watch: polled for a fact, bounded
    try:
        yield mesh, issuer
    finally:
        await mesh.stop()
        server.close()
        await server.wait_closed()


def send_body(order: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {
        "message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
                    "parts": [{"data": {"order_id": order}}],
                    "metadata": {"skill": "lookup_order"}},
        "configuration": {"returnImmediately": False}}}


def rpc(method: str, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 7, "method": method, "params": params}


def api(name: str) -> dict[str, str]:
    return {**H, "X-API-Key": key_of(name)}


def test_roles_and_operations() -> None:
    assert allowed("reader", "GetTask", False) and not allowed("reader", "SendMessage", False)
    assert allowed("submitter", "SendMessage", False)
    assert not allowed("submitter", "SendMessage", True)  # answering an approval
    assert allowed("approver", "SendMessage", True) and not allowed("approver", "CancelTask",
                                                                   False)
    assert allowed("admin", "anything", False) and not allowed("submitter", "POST /x", False)
    assert operation_of("POST", "/", json.dumps(send_body("A1")).encode())[0] == "SendMessage"
    assert operation_of("GET", "/tasks/abc", b"") == ("GetTask", False, None)
    assert operation_of("POST", "/tasks/abc:cancel", b"")[0] == "CancelTask"
    assert operation_of("POST", "/message:send", json.dumps(
        {"message": {"taskId": "t1"}}).encode())[:2] == ("SendMessage", True)


async def test_gateway_authentication_tenants_and_identity(gateway, bus) -> None:
    mesh, issuer = gateway
    base = mesh.base
    async with httpx.AsyncClient(timeout=30) as http:
        # The card is public and declares the schemes.
        card = (await http.get(f"{base}/.well-known/agent-card.json", headers=H)).json()
        schemes = card["securitySchemes"]
        assert schemes["apiKey"]["apiKeySecurityScheme"] == {
            "location": "header", "name": "X-API-Key",
            "description": "A jetmesh API key (tenant and role)"}
        assert schemes["bearer"]["httpAuthSecurityScheme"]["scheme"] == "Bearer"
        assert schemes["oauth2"]["oauth2SecurityScheme"]["flows"]["clientCredentials"][
            "tokenUrl"] == "https://issuer.test/oauth/token"
        assert {n for r in card["securityRequirements"] for n in r["schemes"]} == {
            "apiKey", "bearer", "oauth2"}
        # Missing, unknown, expired, wrong issuer, no role: refused before any handler.
        refusals = {
            "missing": (H, 401),
            "unknown key": ({**H, "X-API-Key": "nope"}, 401),
            "expired": ({**H, "Authorization": "Bearer " + issuer.token("x", exp_in=-60)},
                        401),
            "wrong issuer": ({**H, "Authorization": "Bearer " + issuer.token(
                "x", issuer="https://evil.test")}, 401),
            "not a jwt": ({**H, "Authorization": "Bearer abc.def"}, 401),
            "no role": ({**H, "Authorization": "Bearer " + issuer.token("x", role=None)},
                        403),
            "reader sends": (api("rita"), 403),
        }
        for what, (headers, status) in refusals.items():
            r = await http.post(f"{base}/", json=send_body("A1002"), headers=headers)
            assert r.status_code == status, (what, r.status_code, r.text)
            assert r.json()["error"]["code"] == status and r.json()["id"] == 1, what
            assert r.headers["www-authenticate"].startswith("Bearer"), what
        assert "expired" in (await http.post(f"{base}/", json=send_body("A1"), headers={
            **H, "Authorization": "Bearer " + issuer.token("x", exp_in=-60)})).text
        # Alice (tenant A) submits; the ledger names her and her tenant.
        r = await http.post(f"{base}/", json=send_body("A1002"), headers=api("alice"))
        assert r.status_code == 200, r.text
        task_a = r.json()["result"]["task"]["id"]
        (sub,) = [e.event for e in await bus.ledger.read(task_a)
                  if isinstance(e.event, ev.TaskSubmitted)]
        assert (sub.data.tenant, sub.data.submitted_by) == ("t-a", "api-key:alice")
        # A JWT of tenant B submits; its identity is on the ledger too.
        bearer = {**H, "Authorization": "Bearer " + issuer.token("svc-b", tenant="t-b")}
        r = await http.post(f"{base}/", json=send_body("A1003"), headers=bearer)
        assert r.status_code == 200, r.text
        task_b = r.json()["result"]["task"]["id"]
        (sub_b,) = [e.event for e in await bus.ledger.read(task_b)
                    if isinstance(e.event, ev.TaskSubmitted)]
        assert (sub_b.data.tenant, sub_b.data.submitted_by) == ("t-b", "jwt:svc-b")
        # Tenant B (key or token) cannot read, cancel, subscribe or answer A's task:
        # it does not exist for them.
        for headers in (api("bob"), bearer):
            for body in (rpc("GetTask", id=task_a), rpc("CancelTask", id=task_a)):
                r = await http.post(f"{base}/", json=body, headers=headers)
                assert r.json()["error"]["code"] == -32001, (body["method"], r.text)
            r = await http.get(f"{base}/tasks/{task_a}", headers=headers)
            assert r.status_code == 404, r.text
            listed = (await http.post(f"{base}/", json=rpc("ListTasks", pageSize=100),
                                      headers=headers)).json()["result"]
            ids = {t["id"] for t in listed.get("tasks", [])}
            assert task_a not in ids and task_b in ids
        # Tenant A's reader sees A's task, not B's; the admin sees both.
        r = await http.post(f"{base}/", json=rpc("GetTask", id=task_a), headers=api("rita"))
        assert r.json()["result"]["id"] == task_a
        r = await http.post(f"{base}/", json=rpc("GetTask", id=task_b), headers=api("rita"))
        assert r.json()["error"]["code"] == -32001
        for t in (task_a, task_b):
            r = await http.post(f"{base}/", json=rpc("GetTask", id=t), headers=api("root"))
            assert r.json()["result"]["id"] == t
        # A follow-up message (an approval answer) needs the approver role.
        follow = send_body("A1002")
        follow["params"]["message"]["taskId"] = task_a
        r = await http.post(f"{base}/", json=follow, headers=api("alice"))
        assert r.status_code == 403 and "approval" in r.text


async def test_only_the_tasks_tenants_approver_approves_and_is_recorded(gateway, bus) -> None:
    mesh, _ = gateway
    base = mesh.base
    body = {"jsonrpc": "2.0", "id": 3, "method": "SendMessage", "params": {
        "message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
                    "parts": [{"text": "refund my teapot"}],
                    "metadata": {"skill": "auth_refund"}},
        "configuration": {"returnImmediately": False}}}
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{base}/", json=body, headers=api("alice"))
        task = r.json()["result"]["task"]
        assert task["status"]["state"] == "TASK_STATE_INPUT_REQUIRED", task

        def answer(who: str) -> Any:
            follow = {"jsonrpc": "2.0", "id": 4, "method": "SendMessage", "params": {
                "message": {"messageId": uuid.uuid4().hex, "role": "ROLE_USER",
                            "taskId": task["id"], "parts": [{"text": "approve"}]},
                "configuration": {"returnImmediately": False}}}
            return http.post(f"{base}/", json=follow,
                             headers={**api(who), "Jetmesh-Approver-Token": TOKEN})

        # Tenant B's approver: the task does not exist for it. A's submitter: 403.
        r = await answer("bert")
        assert r.json()["error"]["code"] == -32001, r.text
        assert (await answer("alice")).status_code == 403
        r = await answer("carol")
        assert r.json()["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED", r.text
    granted = [e.event for e in await bus.ledger.read(task["id"])
               if isinstance(e.event, ev.ApprovalGranted)]
    assert [g.data.by for g in granted] == ["api-key:carol"]
