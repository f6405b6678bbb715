"""Fixtures for the model-layer tests: the request switch off, a scripted fake HTTP server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from model_fakes import FakeServer, serve_fake

from jetmesh.agents.models import switch

MODEL_ENV = (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_AUTH_TOKEN",
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "JETMESH_MODEL_PROVIDER",
    "JETMESH_MODEL",
    "JETMESH_SIM_LATENCY_MS",
    "JETMESH_ALLOW_MODEL_REQUESTS",
    "JETMESH_PRICES_FILE",
)


@pytest.fixture(autouse=True)
def _no_real_model_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach a real model API; loopback servers stay reachable."""
    for name in MODEL_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(switch, "ALLOW_MODEL_REQUESTS", False)


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    with serve_fake() as fake:
        yield fake
