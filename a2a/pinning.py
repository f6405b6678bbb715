"""Push notifications connect only to the public address they were checked against.

The push URL policy (a2a-sdk's `validate_push_notification_url`) resolves the host and
refuses private, loopback, link-local and metadata addresses. httpx then resolves the
host again to connect: a name whose DNS answer changes between the two (DNS rebinding:
public for the check, 127.0.0.1 or 169.254.169.254 for the connection) would get the
gateway to POST inside its own network. This transport resolves once per request, refuses
the request if any answer is not public, and connects to that very address, keeping the
name for the Host header and for TLS (SNI and the certificate check).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

Resolve = Callable[[str, int], Awaitable[list[str]]]


def is_public(address: str) -> bool:
    """A public unicast destination (an IPv4-mapped IPv6 address as the IPv4 inside)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_loopback
                                 or ip.is_link_local or ip.is_unspecified)


async def system_resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                         type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class PinnedPublicTransport(httpx.AsyncBaseTransport):
    """Resolve, refuse a non-public answer, connect to the checked address."""

    def __init__(self, *, resolve: Resolve = system_resolve,
                 allowed: Callable[[str], bool] = is_public,
                 inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.resolve, self.allowed = resolve, allowed
        self.inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await self.resolve(host, port)
        except OSError as e:
            raise httpx.ConnectError(f"push host {host!r} does not resolve: {e}",
                                     request=request) from e
        refused = [a for a in addresses if not self.allowed(a)]
        if not addresses or refused:
            raise httpx.ConnectError(
                f"push host {host!r} resolves to a non-public address "
                f"({', '.join(refused) or 'none'}): not connected", request=request)
        address = addresses[0]
        extensions: dict[str, Any] = dict(request.extensions)
        if url.scheme == "https":
            extensions.setdefault("sni_hostname", host)
        pinned = httpx.Request(request.method, url.copy_with(host=address),
                               headers=request.headers, stream=request.stream,
                               extensions=extensions)
        return await self.inner.handle_async_request(pinned)

    async def aclose(self) -> None:
        await self.inner.aclose()
