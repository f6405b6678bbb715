"""The test switch: no request leaves for a non-loopback API while it is off."""

from __future__ import annotations

import pytest

from jetmesh.agents.models import (
    Message,
    ModelCallsDisabled,
    ModelRequest,
    allow_model_requests,
    switch,
)
from jetmesh.agents.models.anthropic import AnthropicModel
from jetmesh.agents.models.openai import OpenAIModel
from jetmesh.agents.models.switch import check_model_request_allowed, is_loopback_url

REQUEST = ModelRequest(messages=[Message(role="user", content="hi")])


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:8080/v1", True),
        ("http://127.3.4.5", True),
        ("http://localhost:11434/v1", True),
        ("http://[::1]:9000", True),
        ("https://api.anthropic.com", False),
        ("https://api.openai.com/v1", False),
        ("http://10.0.0.5:8000/v1", False),
        ("http://localhost.evil.com", False),
    ],
)
def test_is_loopback_url(url: str, loopback: bool) -> None:
    assert is_loopback_url(url) is loopback


async def test_switch_refuses_real_apis_before_any_io() -> None:
    assert switch.ALLOW_MODEL_REQUESTS is False  # set by conftest
    models = [
        AnthropicModel("claude-sonnet-4-5", api_key="k"),
        OpenAIModel("gpt-4.1-mini", api_key="k"),
        OpenAIModel("llama", api_key="k", base_url="http://10.1.2.3:8000/v1"),
    ]
    try:
        for model in models:
            with pytest.raises(ModelCallsDisabled, match="not a loopback address"):
                await model.complete(REQUEST)
    finally:
        for model in models:
            await model.aclose()


def test_allow_model_requests_opts_in_temporarily() -> None:
    with pytest.raises(ModelCallsDisabled):
        check_model_request_allowed("anthropic", "m", "https://api.anthropic.com")
    with allow_model_requests():
        check_model_request_allowed("anthropic", "m", "https://api.anthropic.com")
    assert switch.ALLOW_MODEL_REQUESTS is False
    with pytest.raises(ModelCallsDisabled):
        check_model_request_allowed("anthropic", "m", "https://api.anthropic.com")


def test_env_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JETMESH_ALLOW_MODEL_REQUESTS", "0")
    assert switch.env_allows_model_requests() is False
    monkeypatch.setenv("JETMESH_ALLOW_MODEL_REQUESTS", "1")
    assert switch.env_allows_model_requests() is True
