"""The model layer's exception tree.

Every provider maps its SDK's errors into this tree, so callers handle one set::

    ModelError                      provider, model, message, status
    ├── ModelTransientError         retryable: 408/409/429/5xx, timeout, connection; retry_after
    │   ├── ModelRateLimited        HTTP 429
    │   ├── ModelCircuitOpen        the provider's circuit breaker is open: not called
    │   └── ModelChainExhausted     every model of a fallback chain failed transiently
    ├── ModelAuthError              HTTP 401/403: bad or missing key; never retried
    ├── ModelRequestError           HTTP 400/404/413/422: the request is invalid; never retried
    ├── ModelResponseError          a body that does not parse (bad JSON, bad tool arguments)
    ├── ModelRetriesExhausted       every attempt failed transiently; attempts, last_error
    ├── ModelCallsDisabled          the test switch refused a call to a non-loopback API
    └── ModelConfigError            unknown provider or model name, unloadable sim target
"""

from __future__ import annotations

from jetmesh.bus.errors import JetmeshError


class ModelError(JetmeshError):
    """Base of every model-layer error."""

    def __init__(
        self, provider: str, model: str, message: str, *, status: int | None = None
    ) -> None:
        super().__init__(f"{provider}/{model}: {message}")
        self.provider = provider
        """Provider name, e.g. ``anthropic``."""
        self.model = model
        """Model name as configured."""
        self.message = message
        """What went wrong, without the ``provider/model`` prefix."""
        self.status = status
        """HTTP status when the error came from an HTTP response."""


class ModelTransientError(ModelError):
    """A failure worth retrying: overload, rate limit, 5xx, timeout or lost connection."""

    def __init__(
        self,
        provider: str,
        model: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(provider, model, message, status=status)
        self.retry_after = retry_after
        """Seconds the server asked us to wait (Retry-After), if it said."""


class ModelRateLimited(ModelTransientError):
    """HTTP 429."""


class ModelCircuitOpen(ModelTransientError):
    """The circuit breaker in front of this provider is open: the call was not made.

    ``retry_after`` is the time until the breaker lets a probe call through.
    """

    def __init__(
        self, provider: str, model: str, message: str, *, breaker: str,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(provider, model, message, retry_after=retry_after)
        self.breaker = breaker
        """Name of the open breaker, e.g. ``anthropic``."""


class ModelChainExhausted(ModelTransientError):
    """Every model of a fallback chain failed transiently (or had its circuit open)."""

    def __init__(
        self, provider: str, model: str, message: str, *, errors: list[ModelError],
        retry_after: float | None = None,
    ) -> None:
        super().__init__(provider, model, message, retry_after=retry_after)
        self.errors = errors
        """One error per model tried, in chain order."""


class ModelAuthError(ModelError):
    """HTTP 401/403: the key is missing, wrong or lacks permission."""


class ModelRequestError(ModelError):
    """The provider rejected the request as invalid (HTTP 400/404/413/422)."""


class ModelResponseError(ModelError):
    """The provider answered with a body we cannot interpret."""


class ModelRetriesExhausted(ModelError):
    """All attempts failed with transient errors."""

    def __init__(
        self, provider: str, model: str, message: str, *, attempts: int, last_error: ModelError
    ) -> None:
        super().__init__(provider, model, message, status=last_error.status)
        self.attempts = attempts
        """How many calls were made."""
        self.last_error = last_error
        """The error of the final attempt."""


class ModelCallsDisabled(ModelError):
    """Model requests are switched off (tests) and the target is not a loopback address."""


class ModelConfigError(ModelError):
    """The model configuration names something that does not exist or cannot load."""
