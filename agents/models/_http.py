"""Mapping HTTP statuses and SDK exceptions (anthropic, openai) into the error tree."""

from __future__ import annotations

import json
from types import ModuleType

import pydantic

from jetmesh.agents.models.errors import (
    ModelAuthError,
    ModelError,
    ModelRateLimited,
    ModelRequestError,
    ModelResponseError,
    ModelTransientError,
)
from jetmesh.agents.models.retry import parse_retry_after

_TRANSIENT_STATUSES = {408, 409, 425, 429}
_MAX_DETAIL = 500


def error_for_status(
    provider: str, model: str, status: int, detail: str, retry_after: float | None = None
) -> ModelError:
    """The error for an HTTP error status (pure: the classification lives here)."""
    message = f"HTTP {status}: {detail[:_MAX_DETAIL]}".rstrip(": ")
    if status == 429:
        return ModelRateLimited(provider, model, message, status=status, retry_after=retry_after)
    if status in _TRANSIENT_STATUSES or status >= 500:
        return ModelTransientError(provider, model, message, status=status, retry_after=retry_after)
    if status in (401, 403):
        return ModelAuthError(provider, model, message, status=status)
    return ModelRequestError(provider, model, message, status=status)


def map_sdk_error(sdk: ModuleType, exc: BaseException, provider: str, model: str) -> ModelError:
    """Translate an exception raised by the ``anthropic`` or ``openai`` SDK.

    Both SDKs share the same exception hierarchy names, so one function serves both.
    Callers pass SDK errors and body parse failures (JSON, pydantic); anything else
    becomes `ModelResponseError`.
    """
    if isinstance(exc, ModelError):
        return exc
    if isinstance(exc, sdk.APITimeoutError):
        return ModelTransientError(provider, model, f"timeout: {exc}")
    if isinstance(exc, sdk.APIConnectionError):
        return ModelTransientError(provider, model, f"connection error: {exc}")
    if isinstance(exc, sdk.APIResponseValidationError):
        return ModelResponseError(
            provider, model, f"malformed response body: {exc}", status=exc.status_code
        )
    if isinstance(exc, sdk.APIStatusError):
        headers = dict(exc.response.headers) if exc.response is not None else None
        return error_for_status(
            provider, model, exc.status_code, str(exc.message), parse_retry_after(headers)
        )
    if isinstance(exc, pydantic.ValidationError):
        return ModelResponseError(
            provider, model, f"response body has the wrong shape: {_short(exc)}"
        )
    if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):
        return ModelResponseError(provider, model, f"response body is not valid JSON: {exc}")
    return ModelResponseError(provider, model, f"{type(exc).__name__}: {exc}")


def _short(exc: pydantic.ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return str(exc)
    loc = ".".join(str(p) for p in errors[0]["loc"])
    return f"{exc.error_count()} error(s), first at {loc or '<root>'}: {errors[0]['msg']}"
