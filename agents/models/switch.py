"""The test switch that stops model requests from reaching a real API.

``ALLOW_MODEL_REQUESTS`` starts from env ``JETMESH_ALLOW_MODEL_REQUESTS`` (default on).
When off, the HTTP providers raise `ModelCallsDisabled` before any network I/O unless
their base URL is a loopback address, so tests against local fake servers still run.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

from jetmesh.agents.models.errors import ModelCallsDisabled

__all__ = [
    "ALLOW_MODEL_REQUESTS",
    "allow_model_requests",
    "check_model_request_allowed",
    "is_loopback_url",
]

_FALSE = {"0", "false", "no", "off"}


def env_allows_model_requests() -> bool:
    """Read ``JETMESH_ALLOW_MODEL_REQUESTS`` (unset means allowed)."""
    return os.environ.get("JETMESH_ALLOW_MODEL_REQUESTS", "1").strip().lower() not in _FALSE


ALLOW_MODEL_REQUESTS: bool = env_allows_model_requests()
"""Process-wide switch; tests set it to False (see `allow_model_requests` to opt in)."""


@contextmanager
def allow_model_requests(allow: bool = True) -> Iterator[None]:
    """Temporarily set `ALLOW_MODEL_REQUESTS` (to True by default)."""
    global ALLOW_MODEL_REQUESTS
    previous = ALLOW_MODEL_REQUESTS
    ALLOW_MODEL_REQUESTS = allow
    try:
        yield
    finally:
        ALLOW_MODEL_REQUESTS = previous


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is localhost or a loopback IP (127.0.0.0/8, ::1)."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_model_request_allowed(provider: str, model: str, base_url: str) -> None:
    """Raise `ModelCallsDisabled` if requests are off and ``base_url`` is not loopback."""
    if ALLOW_MODEL_REQUESTS or is_loopback_url(base_url):
        return
    raise ModelCallsDisabled(
        provider,
        model,
        f"model requests are disabled (ALLOW_MODEL_REQUESTS is off) and {base_url} "
        "is not a loopback address; use allow_model_requests() to opt in",
    )
