"""Push notifications go only to the public address the URL policy checked (a2a/pinning):
a host whose DNS answer turns private after the check (DNS rebinding) gets no request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from jetmesh.a2a.pinning import PinnedPublicTransport, is_public
from jetmesh.a2a.push import PushNotifications


class Hook:
    """A local HTTP server that records each request's head."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.connections = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        await reader.readexactly(length)
        self.heads.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()
        writer.close()


@pytest.fixture
async def hook() -> AsyncIterator[tuple[Hook, int]]:
    h = Hook()
    server = await asyncio.start_server(h.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield h, port


def test_public_means_public() -> None:
    for address in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                    "100.64.0.1", "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fc00::1",
                    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "240.0.0.1", "not an ip"):
        assert not is_public(address), address
    for address in ("8.8.8.8", "93.184.216.34", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        assert is_public(address), address


async def test_a_name_that_rebinds_to_loopback_gets_no_request(hook) -> None:
    h, port = hook
    answers = {"rebind.example": ["127.0.0.1"], "mixed.example": ["8.8.8.8", "127.0.0.1"],
               "metadata.example": ["169.254.169.254"]}

    async def resolve(host: str, _port: int) -> list[str]:
        return answers[host]

    async with httpx.AsyncClient(transport=PinnedPublicTransport(resolve=resolve)) as http:
        for host in answers:
            with pytest.raises(httpx.ConnectError, match="non-public"):
                await http.post(f"http://{host}:{port}/hook", json={"x": 1})
    assert h.connections == 0


async def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(hook) -> None:
    h, port = hook
    asked: list[str] = []

    async def resolve(host: str, _port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    transport = PinnedPublicTransport(resolve=resolve, allowed=lambda _a: True)
    async with httpx.AsyncClient(transport=transport) as http:
        r = await http.post(f"http://hook.example:{port}/a2a/push?x=1", json={"n": 1})
    assert r.status_code == 200 and asked == ["hook.example"]
    [head] = h.heads
    assert head.startswith("POST /a2a/push?x=1 HTTP/1.1")
    assert f"host: hook.example:{port}" in head.lower()


async def test_a_host_that_does_not_resolve_is_a_connect_error() -> None:
    async def resolve(host: str, _port: int) -> list[str]:
        raise OSError("no such host")

    async with httpx.AsyncClient(transport=PinnedPublicTransport(resolve=resolve)) as http:
        with pytest.raises(httpx.ConnectError, match="does not resolve"):
            await http.get("http://nowhere.example/")


async def test_the_gateway_sender_pins_when_the_url_policy_is_on(hook) -> None:
    """The policy said yes (as for a name public when set); the connection still refuses
    loopback. With private URLs allowed (no policy) the same post goes through."""
    h, port = hook

    async def says_public(_url: str) -> bool:
        return True

    guarded = PushNotifications(None, None, None, url_validator=says_public,  # type: ignore[arg-type]
                                deliver=False)
    open_ = PushNotifications(None, None, None, deliver=False)  # type: ignore[arg-type]
    try:
        with pytest.raises(httpx.ConnectError, match="non-public"):
            await guarded.http.post(f"http://127.0.0.1:{port}/hook", json={})
        assert h.connections == 0
        assert (await open_.http.post(f"http://127.0.0.1:{port}/hook", json={})).status_code == 200
        assert h.connections == 1
    finally:
        await guarded.http.aclose()
        await open_.http.aclose()
