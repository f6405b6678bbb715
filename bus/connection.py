"""Connecting to NATS with the configured URL and credentials."""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from jetmesh.bus import natsfast
from jetmesh.bus.errors import NotConnectedError
from jetmesh.bus.settings import BusSettings

log = logging.getLogger("jetmesh.bus")


async def connect(
    url: str | None = None, *, settings: BusSettings | None = None, name: str = "jetmesh",
    **options: Any,
) -> NATS:
    """Connect to `url` (or NATS_URL). Reconnects forever once connected."""
    settings = settings or BusSettings()
    target = url or settings.nats_url
    if not target:
        raise NotConnectedError(
            "<unset>",
            RuntimeError("NATS_URL is not set; start one with `jetmesh nats` or `jetmesh up`"),
        )
    kwargs: dict[str, Any] = {
        "servers": [u.strip() for u in target.split(",")],
        "name": name,
        "connect_timeout": settings.connect_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.25,
        "allow_reconnect": True,
    }
    if settings.nats_creds:
        kwargs["user_credentials"] = str(settings.nats_creds)
    if settings.nats_inbox_prefix:
        kwargs["inbox_prefix"] = settings.nats_inbox_prefix
    if settings.nats_user:
        kwargs["user"] = settings.nats_user
        kwargs["password"] = settings.nats_password or ""

    async def _error_cb(e: Exception) -> None:
        log.debug("nats: %s", e)

    kwargs["error_cb"] = _error_cb
    kwargs.update(options)
    nc = natsfast.apply(NATS())  # this connection only: the host's nats-py is untouched
    try:
        await nc.connect(**kwargs)
    except Exception as e:  # nats raises several unrelated types here
        raise NotConnectedError(target, e) from e
    return nc


def jetstream(nc: NATS, settings: BusSettings | None = None) -> JetStreamContext:
    settings = settings or BusSettings()
    return nc.jetstream(timeout=settings.request_timeout_s)
