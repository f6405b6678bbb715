"""Connecting to NATS with the configured URL and credentials."""

from __future__ import annotations

import gc
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


GC_THRESHOLD = (20_000, 20, 20)
"""The cyclic collector's thresholds for a serving role (Python's default: 700, 10, 10).
A role allocates a few hundred short-lived objects per message (pydantic models, dicts,
futures); at 700 the young generation is collected every few messages and its survivors
soon make the full collections that walk every live object (tens of ms each)."""


def tune_gc(threshold: tuple[int, int, int] = GC_THRESHOLD) -> None:
    """For a long-running role, once it serves: what is alive now (modules, schemas,
    specs, connections: what the process holds until it exits) moves out of the
    collector's sight (`gc.freeze`), and the young generation is collected less often.
    Measured on the fan-out benchmark (B, 300 tasks): the worker's collections in the
    timed window took 0.33 s, the orchestrator's 0.26 s (about 1.1 and 0.9 ms of CPU
    per task); with this 0.02 s and 0.04 s. Reference cycles are still collected, a
    little later; only objects alive at the call are never collected again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*threshold)
