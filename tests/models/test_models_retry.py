"""Error classification and the retry loop."""

from __future__ import annotations

import email.utils
import time

import anthropic
import httpx
import openai
import pytest

from jetmesh.agents.models import (
    ModelAuthError,
    ModelError,
    ModelRateLimited,
    ModelRequestError,
    ModelRetriesExhausted,
    ModelTransientError,
    RetryPolicy,
)
from jetmesh.agents.models._http import error_for_status, map_sdk_error
from jetmesh.agents.models.retry import call_with_retries, parse_retry_after


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, ModelRateLimited),
        (500, ModelTransientError),
        (503, ModelTransientError),
        (529, ModelTransientError),
        (408, ModelTransientError),
        (401, ModelAuthError),
        (403, ModelAuthError),
        (400, ModelRequestError),
        (404, ModelRequestError),
        (422, ModelRequestError),
    ],
)
def test_error_for_status(status: int, kind: type[ModelError]) -> None:
    err = error_for_status("p", "m", status, "detail")
    assert type(err) is kind
    assert err.status == status
    assert str(err) == f"p/m: HTTP {status}: detail"


def test_parse_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    parsed = parse_retry_after({"retry-after": later})
    assert parsed is not None and 25 < parsed <= 30


@pytest.mark.parametrize("sdk", [anthropic, openai], ids=["anthropic", "openai"])
def test_sdk_connection_errors_are_transient(sdk: object) -> None:
    request = httpx.Request("POST", "http://127.0.0.1/v1")
    timeout = map_sdk_error(sdk, sdk.APITimeoutError(request=request), "p", "m")  # type: ignore[attr-defined,arg-type]
    assert type(timeout) is ModelTransientError and "timeout" in timeout.message
    conn = map_sdk_error(sdk, sdk.APIConnectionError(request=request), "p", "m")  # type: ignore[attr-defined,arg-type]
    assert type(conn) is ModelTransientError


class Flaky:
    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


async def record(delays: list[float], d: float) -> None:
    delays.append(d)


def policy(delays: list[float], **kw: float) -> RetryPolicy:
    return RetryPolicy(sleep=lambda d: record(delays, d), random=lambda: 0.5, **kw)  # type: ignore[arg-type]


async def test_backoff_is_exponential_with_full_jitter() -> None:
    delays: list[float] = []
    flaky = Flaky(*(ModelTransientError("p", "m", "HTTP 500") for _ in range(3)))
    result = await call_with_retries(
        flaky, provider="p", model="m", policy=policy(delays, base_delay_s=1.0, max_delay_s=3.0)
    )
    assert result == "ok" and flaky.calls == 4
    assert delays == [0.5, 1.0, 1.5]  # 0.5 * min(3, 1, 2, 4)


async def test_retry_after_is_honoured_and_capped() -> None:
    delays: list[float] = []
    flaky = Flaky(
        ModelRateLimited("p", "m", "HTTP 429", status=429, retry_after=2.0),
        ModelRateLimited("p", "m", "HTTP 429", status=429, retry_after=500.0),
    )
    await call_with_retries(
        flaky, provider="p", model="m", policy=policy(delays, max_retry_after_s=10.0)
    )
    assert delays == [2.0, 10.0]


@pytest.mark.parametrize(
    "error",
    [ModelAuthError("p", "m", "HTTP 401", status=401), ModelRequestError("p", "m", "HTTP 400")],
)
async def test_no_retry_on_permanent_errors(error: ModelError) -> None:
    delays: list[float] = []
    flaky = Flaky(error)
    with pytest.raises(type(error)):
        await call_with_retries(flaky, provider="p", model="m", policy=policy(delays))
    assert flaky.calls == 1 and delays == []


async def test_exhaustion_message_and_fields() -> None:
    delays: list[float] = []
    errors = [ModelTransientError("p", "m", f"HTTP 500: boom {i}", status=500) for i in range(4)]
    flaky = Flaky(*errors)
    with pytest.raises(ModelRetriesExhausted) as info:
        await call_with_retries(
            flaky, provider="anthropic", model="claude-x", policy=policy(delays)
        )
    err = info.value
    assert str(err) == "anthropic/claude-x: 4 attempts failed, last: HTTP 500: boom 3"
    assert err.attempts == 4 and err.last_error is errors[3] and err.status == 500
    assert len(delays) == 3
