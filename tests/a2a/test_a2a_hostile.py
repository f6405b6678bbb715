"""Hostile HTTP input at the A2A gateway: a clear client error, never a 5xx, and the
gateway keeps serving (issue 14, the edge's rules applied to the HTTP edge too)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from a2a_mesh import Mesh
from a2a_support import Bus

from jetmesh.agents.builtin import get_agent

HEADERS = {"A2A-Version": "1.0", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
async def hostile_gateway(a2a_bus: Bus) -> AsyncIterator[Mesh]:
    mesh = Mesh(a2a_bus.url, [get_agent("orders")])
    await mesh.start()
    yield mesh
    await mesh.stop()


def rpc(text: str, **extra: object) -> dict:
    return {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {
        "messageId": "m1", "role": "ROLE_USER", "parts": [{"text": text}], **extra}}}


BODIES = {
    "deep": b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": '
            + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}",
    "deep list": b"[" * 100_000 + b"]" * 100_000,
    "not utf-8": b'{"jsonrpc": "2.0", "id": 1, "method": "\xff\xfe"}',
    "surrogate": json.dumps(rpc("\\ud800")).replace("\\\\ud800", "\\ud800").encode(),
    "nan": b'{"jsonrpc": "2.0", "id": NaN, "method": "GetTask", "params": {"id": "x"}}',
    "garbage": b"\x00\x01\x02",
    "empty": b"",
}


REFUSED_AT_THE_EDGE = {"deep", "deep list", "not utf-8", "surrogate", "nan"}


@pytest.mark.parametrize("name", sorted(BODIES))
async def test_hostile_bodies_get_a_client_error_and_the_gateway_keeps_serving(
        hostile_gateway: Mesh, name: str) -> None:
    base = hostile_gateway.base
    async with httpx.AsyncClient(timeout=30) as http:
        for path in ("/", "/message:send"):
            res = await http.post(base.rstrip("/") + path, content=BODIES[name],
                                  headers=HEADERS)
            assert res.status_code < 500, (path, res.status_code, res.text[:300])
            if name in REFUSED_AT_THE_EDGE:
                error = res.json()["error"]
                assert ("Parse error" if path == "/" else "invalid request body") \
                    in error["message"], error
        card = await http.get(base.rstrip("/") + "/.well-known/agent-card.json")
        assert card.status_code == 200
