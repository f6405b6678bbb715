"""Retries with exponential backoff and full jitter for transient model errors."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from jetmesh.agents.models.errors import ModelRetriesExhausted, ModelTransientError
from jetmesh.bus import headers as hn

__all__ = ["RetryPolicy", "call_with_retries", "parse_retry_after"]

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry transient errors."""

    max_attempts: int = 4
    """Total calls, including the first."""
    base_delay_s: float = 0.5
    """Backoff before retry n is uniform(0, min(max_delay_s, base_delay_s * 2**(n-1)))."""
    max_delay_s: float = 30.0
    """Cap of the jittered backoff."""
    max_retry_after_s: float = 60.0
    """Cap on a server's Retry-After; longer waits are shortened to this."""
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, compare=False)
    """Injected for tests that record the delays."""
    random: Callable[[], float] = field(default=random.random, compare=False)
    """Source of jitter in [0, 1)."""

    def delay(self, attempt: int, error: ModelTransientError) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if error.retry_after is not None:
            return max(0.0, min(float(error.retry_after), self.max_retry_after_s))
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return float(self.random() * ceiling)


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    *,
    provider: str,
    model: str,
    policy: RetryPolicy | None = None,
) -> T:
    """Run ``call``, retrying `ModelTransientError` up to ``policy.max_attempts`` calls.

    Other errors (auth, invalid request, malformed body, anything not a model error)
    propagate at once. Raises `ModelRetriesExhausted` when every attempt failed.
    """
    policy = policy or RetryPolicy()
    attempts = max(1, policy.max_attempts)
    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except ModelTransientError as exc:
            if attempt == attempts:
                raise ModelRetriesExhausted(
                    provider,
                    model,
                    f"{attempt} attempts failed, last: {exc.message}",
                    attempts=attempt,
                    last_error=exc,
                ) from exc
            delay = policy.delay(attempt, exc)
            log.warning(
                "%s/%s attempt %d/%d failed (%s); retrying in %.2fs",
                provider,
                model,
                attempt,
                attempts,
                exc.message,
                delay,
            )
            await policy.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    lowered = {k.lower(): v for k, v in headers.items()}
    ms = lowered.get(hn.RETRY_AFTER_MS)
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = lowered.get(hn.RETRY_AFTER)
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
